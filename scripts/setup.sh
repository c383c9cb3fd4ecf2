#!/usr/bin/env bash
# Installs what building, testing and benchmarking Outpost needs on a fresh Debian 12 machine.
# Idempotent: each step checks before it installs. Run as root (or with sudo available).
set -euo pipefail

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)   # etcd-client's build (bench)
command -v cc >/dev/null || need_apt+=(build-essential)
command -v python3 >/dev/null || need_apt+=(python3)
command -v docker-registry >/dev/null || need_apt+=(docker-registry)   # a real OCI registry for the Wasm-artifact tests
# OCI pods: libcontainer's seccomp filters link libseccomp; the OCI tests build their image from
# busybox-static's /bin/busybox.
[ -e /usr/include/seccomp.h ] || need_apt+=(libseccomp-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx unshare || need_apt+=(busybox-static)
command -v umoci >/dev/null || need_apt+=(umoci)     # the interop test builds an image with them
command -v skopeo >/dev/null || need_apt+=(skopeo)
# Nodes masquerade OCI pods' traffic leaving them with nftables; iproute2 makes pod networks.
command -v nft >/dev/null || need_apt+=(nftables)
command -v ip >/dev/null || need_apt+=(iproute2)
python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
# Boards: deploy/build.sh cross-builds for aarch64 (ring builds C), the deploy tests run the
# result under qemu-user and write disk images with e2fsprogs' debugfs.
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null || need_apt+=(qemu-user-static)
command -v debugfs >/dev/null || need_apt+=(e2fsprogs)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)   # the units are verified with it
if [ "${OUTPOST_BENCH:-0}" = 1 ]; then
  command -v etcd >/dev/null || need_apt+=(etcd-server)
  command -v etcdctl >/dev/null || need_apt+=(etcd-client)
  command -v wrk >/dev/null || need_apt+=(wrk)   # the load of `outpost-bench http`
  command -v runc >/dev/null || need_apt+=(runc)   # the OCI peer of `outpost-bench oci`
  command -v iperf3 >/dev/null || need_apt+=(iperf3)       # `outpost-bench netd`: throughput
  command -v sockperf >/dev/null || need_apt+=(sockperf)   # `outpost-bench netd`: latency
  command -v nft >/dev/null || need_apt+=(nftables)        # `outpost-bench netd`: the kernel DNAT peer
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The Wasm peer of `outpost-bench node`: the wasmtime CLI of the same major version.
if [ "${OUTPOST_BENCH:-0}" = 1 ] && ! wasmtime --version 2>/dev/null | grep -q '^wasmtime 48'; then
  cargo install --locked wasmtime-cli --version '^48'
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target list --installed | grep -qx aarch64-unknown-linux-musl \
  || rustup target add aarch64-unknown-linux-musl

# The official Python Kubernetes client, for the end-to-end suite.
PY="$HOME/.cache/outpost/py"
if ! "$PY/bin/python" -c "import kubernetes" 2>/dev/null; then
  python3 -m venv "$PY"
  "$PY/bin/pip" install -q kubernetes
fi
command -v kubectl >/dev/null || echo "warning: kubectl is not on PATH; the end-to-end suite needs it" >&2
