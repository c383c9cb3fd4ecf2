"""The official Python `kubernetes` client's port-forward (the v4/v5 channel protocol, not
SPDY) to an HTTP pod. Usage: portforward.py POD PORT; KUBECONFIG set. Prints the reply."""
import sys

from kubernetes import client, config
from kubernetes.stream import portforward

config.load_kube_config()
core = client.CoreV1Api()
pod, port = sys.argv[1], int(sys.argv[2])
pf = portforward(core.connect_get_namespaced_pod_portforward, pod, "default", ports=str(port))
sock = pf.socket(port)
sock.setblocking(True)
sock.sendall(b"GET /from/python HTTP/1.0\r\nHost: localhost\r\n\r\n")
reply = b""
while True:
    chunk = sock.recv(4096)
    if not chunk:
        break
    reply += chunk
sock.close()
error = pf.error(port)
assert error is None, error
print(reply.decode())
