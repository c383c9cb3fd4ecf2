#!/usr/bin/env bash
# Cross-builds the binaries a board runs, from this x86_64 machine, as static executables:
#   outpost-node       the node agent: Wasm pods (with the Cranelift compiler) and OCI pods
#   outpost-node-aot   the small agent for small boards: Wasm pods only, without a compiler;
#                      it runs modules the control plane compiled ahead of time for it
#   outpost-control, outpost   the control plane and the admin command
# into deploy/out/TARGET/ and prints their sizes. Installs what it needs first: the rustup
# target and Debian's aarch64 gcc (ring builds C and assembly).
#
#   deploy/build.sh [--target aarch64-unknown-linux-musl] [--profile deploy] [--only node-aot]
#
# musl builds leave out libseccomp (Debian has no static musl build of it): an OCI pod's
# seccomp profile is not enforced by such an agent, and the agent says so when it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-musl
profile=deploy
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    *) echo "usage: $0 [--target T] [--profile P] [--only node|node-aot|control]" >&2; exit 2 ;;
  esac
done

rustup target list --installed | grep -qx "$target" || rustup target add "$target"
case "$target" in
  aarch64-*)
    if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
      SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross
    fi
    # ring's C needs only freestanding headers, so the glibc cross compiler serves musl too;
    # the musl target links against Rust's own self-contained musl.
    export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
    if [ "$target" = aarch64-unknown-linux-gnu ]; then
      # glibc builds link Debian's arm64 libseccomp statically (multiarch).
      if [ ! -e /usr/lib/aarch64-linux-gnu/libseccomp.a ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO dpkg --add-architecture arm64
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libseccomp-dev:arm64
      fi
      export LIBSECCOMP_LIB_PATH=/usr/lib/aarch64-linux-gnu LIBSECCOMP_LINK_TYPE=static
    fi
    ;;
  x86_64-*-musl)
    # For measuring a board's build on this machine (`outpost-bench node --agent`): the
    # host's gcc serves ring's C as the cross compiler does above.
    export CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-gcc}"
    ;;
esac
features=""
case "$target" in *-musl) ;; *) features="seccomp" ;; esac
oci="oci${features:+,$features}"

target_dir="${CARGO_TARGET_DIR:-target}"
out="deploy/out/$target"
mkdir -p "$out"
dir="$profile"; [ "$profile" = dev ] && dir=debug
built="$target_dir/$target/$dir"

build() { # name package bin features
  [ -z "$only" ] || [ "$only" = "$1" ] || return 0
  cargo build --locked --profile "$profile" --target "$target" -p "$2" --bin "$3" \
    --no-default-features ${4:+--features "$4"}
  cp "$built/$3" "$out/$1.tmp" && mv "$out/$1.tmp" "$out/$1"
}
build node outpost-edge-node outpost-node "compiler,$oci"
build node-aot outpost-edge-node outpost-node ""
if [ -e "$out/node" ]; then mv "$out/node" "$out/outpost-node"; fi
if [ -e "$out/node-aot" ]; then mv "$out/node-aot" "$out/outpost-node-aot"; fi
if [ -z "$only" ] || [ "$only" = control ]; then
  cargo build --locked --profile "$profile" --target "$target" -p outpost-control --bins \
    --no-default-features ${features:+--features "$features"}
  cp "$built/outpost-control" "$built/outpost" "$out/"
fi

echo "stripped sizes ($target, profile $profile):"
for f in "$out"/*; do
  awk -v n="$(basename "$f")" -v s="$(stat -c %s "$f")" 'BEGIN { printf "  %-18s %6.1f MB\n", n, s / 1e6 }'
done
