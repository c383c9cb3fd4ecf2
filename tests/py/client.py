"""The official Python `kubernetes` client against Outpost: list, watch, create, patch,
server-side apply, errors, events in both API groups and their expiry, custom resources. Run by
tests/tests/python_client.rs with KUBECONFIG set, against a server whose --event-ttl is 5 s."""
import datetime
import threading
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()

assert client.VersionApi().get_code().minor == "32"
names = {n.metadata.name for n in core.list_namespace().items}
assert {"default", "kube-system"} <= names, names

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="py")))
events = []
rv = core.list_namespaced_config_map("py").metadata.resource_version


def follow():
    w = watch.Watch()
    for ev in w.stream(core.list_namespaced_config_map, "py", resource_version=rv, timeout_seconds=10):
        events.append((ev["type"], ev["object"].metadata.name, ev["object"].data))
        if ev["type"] == "DELETED":
            w.stop()


t = threading.Thread(target=follow)
t.start()
cm = core.create_namespaced_config_map("py", {"apiVersion": "v1", "kind": "ConfigMap",
                                               "metadata": {"name": "c", "labels": {"a": "1"}},
                                               "data": {"k": "v"}})
assert cm.metadata.uid and cm.metadata.resource_version
core.patch_namespaced_config_map("c", "py", {"data": {"k": "v2"}})  # strategic merge
core.patch_namespaced_config_map("c", "py", [{"op": "add", "path": "/data/j", "value": "x"}])  # JSON patch
got = core.read_namespaced_config_map("c", "py")
assert got.data == {"k": "v2", "j": "x"}, got.data
assert [c.metadata.name for c in core.list_namespaced_config_map("py", label_selector="a=1").items] == ["c"]
assert core.list_namespaced_config_map("py", label_selector="a=2").items == []

dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
       "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "d"}},
                "template": {"metadata": {"labels": {"app": "d"}},
                             "spec": {"containers": [{"name": "c", "image": "busybox",
                                                      "resources": {"limits": {"cpu": "1"}}}]}}}}
made = apps.create_namespaced_deployment("py", dep)
assert made.spec.template.spec.containers[0].resources.limits["cpu"] == "1"
apps.patch_namespaced_deployment_scale("d", "py", {"spec": {"replicas": 3}})
assert apps.read_namespaced_deployment_scale("d", "py").spec.replicas == 3
applied = apps.patch_namespaced_deployment("d", "py", dep, field_manager="py", force=True,
                                          _content_type="application/apply-patch+yaml")
assert applied.spec.replicas == 1

try:
    core.create_namespaced_config_map("py", {"metadata": {"name": "c"}})
    raise SystemExit("duplicate create succeeded")
except ApiException as e:
    assert e.status == 409, e.status
try:
    core.read_namespaced_config_map("nope", "py")
    raise SystemExit("read of a missing object succeeded")
except ApiException as e:
    assert e.status == 404 and "not found" in e.body

core.delete_namespaced_config_map("c", "py")
t.join(15)
kinds = [e[0] for e in events]
assert kinds[0] == "ADDED" and "MODIFIED" in kinds and kinds[-1] == "DELETED", events

# events.k8s.io/v1 and core/v1 are two views of one set of events, as in Kubernetes.
ev = client.EventsV1Api()
seen = []


def follow_events():
    for e in watch.Watch().stream(ev.list_namespaced_event, "py", timeout_seconds=10,
                                  field_selector="reportingController=example.com/py"):
        seen.append((e["type"], e["object"].note))
        return


t = threading.Thread(target=follow_events)
t.start()
time.sleep(1)
made = ev.create_namespaced_event("py", client.EventsV1Event(
    metadata=client.V1ObjectMeta(name="e1"), event_time=datetime.datetime.now(datetime.timezone.utc),
    reporting_controller="example.com/py", reporting_instance="py-1", action="Testing",
    reason="Probe", type="Normal", note="from events.k8s.io",
    regarding=client.V1ObjectReference(kind="ConfigMap", name="c", namespace="py")))
assert made.api_version == "events.k8s.io/v1" and made.note == "from events.k8s.io", made
t.join(15)
assert seen == [("ADDED", "from events.k8s.io")], seen
old = core.read_namespaced_event("e1", "py")
assert (old.message, old.involved_object.name, old.reporting_component) == \
    ("from events.k8s.io", "c", "example.com/py"), old
assert [e.metadata.name for e in ev.list_namespaced_event("py", field_selector="regarding.name=c").items] == ["e1"]
ev.patch_namespaced_event("e1", "py", {"note": "patched"})
assert core.read_namespaced_event("e1", "py").message == "patched"
try:
    ev.list_namespaced_event("py", field_selector="involvedObject.name=c")
    raise SystemExit("a core field name was taken by events.k8s.io")
except ApiException as e:
    assert e.status == 400 and "field label not supported" in e.body, e.body
# Gone once the server's event TTL has passed since its last write.
deadline = time.time() + 30
while any(e.metadata.name == "e1" for e in core.list_namespaced_event("py").items):
    assert time.time() < deadline, "the event outlived the TTL"
    time.sleep(0.5)
# Custom resources: a CRD through ApiextensionsV1Api, its objects through CustomObjectsApi.
ext = client.ApiextensionsV1Api()
crd = ext.create_custom_resource_definition({
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "doodads.py.example.org"},
    "spec": {"group": "py.example.org", "scope": "Namespaced",
             "names": {"plural": "doodads", "kind": "Doodad"},
             "versions": [{"name": "v1", "served": True, "storage": True,
                           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                               "spec": {"type": "object", "properties": {
                                   "size": {"type": "integer", "default": 1}}}}}}}]}})
assert [c.type for c in crd.status.conditions] == ["NamesAccepted", "Established"], crd.status
co = client.CustomObjectsApi()
made = co.create_namespaced_custom_object("py.example.org", "v1", "py", "doodads", {
    "apiVersion": "py.example.org/v1", "kind": "Doodad", "metadata": {"name": "d"},
    "spec": {"extra": True}})
assert made["spec"] == {"size": 1}, made["spec"]  # pruned and defaulted
co.patch_namespaced_custom_object("py.example.org", "v1", "py", "doodads", "d", {"spec": {"size": 4}})
got = co.list_namespaced_custom_object("py.example.org", "v1", "py", "doodads")["items"]
assert [(o["kind"], o["metadata"]["name"], o["spec"]["size"]) for o in got] == [("Doodad", "d", 4)], got
try:
    co.create_namespaced_custom_object("py.example.org", "v1", "py", "doodads", {
        "apiVersion": "py.example.org/v1", "kind": "Doodad", "metadata": {"name": "e"},
        "spec": {"size": "big"}})
    raise SystemExit("a string size was taken")
except ApiException as e:
    assert e.status == 422 and "spec.size in body must be of type integer" in e.body, e.body
ext.delete_custom_resource_definition("doodads.py.example.org")
print("python client: ok", kinds)
