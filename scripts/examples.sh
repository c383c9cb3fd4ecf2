#!/usr/bin/env bash
# Builds the Wasm examples (examples/*) and copies them to examples/out/NAME.wasm (preview 1
# modules) and examples/out/hello-p2.wasm and
# examples/out/http-hello.wasm (preview 2 components).
# Adds the rustup targets they need first.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost/target}"
cargo build -q --release --manifest-path examples/Cargo.toml --target wasm32-wasip1
mkdir -p examples/out
for n in hello cpu-burner memory-hog sleeper; do
  cp "$CARGO_TARGET_DIR/wasm32-wasip1/release/$n.wasm" "examples/out/$n.wasm"
done
# The same hello as a WASI preview 2 component (wasi:cli/run), and the wasi:http component.
cargo build -q --release --manifest-path examples/Cargo.toml --target wasm32-wasip2 -p hello -p http-hello
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/hello.wasm" examples/out/hello-p2.wasm
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/http_hello.wasm" examples/out/http-hello.wasm
ls -l examples/out
