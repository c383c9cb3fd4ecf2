#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, integration and end-to-end tests.
# Installs what it needs first (scripts/setup.sh). Builds once into a target directory shared
# across runs and clones (CARGO_TARGET_DIR, default ~/.cache/outpost/target), then runs every
# test, including those marked #[ignore = "needs root …"], in parallel with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental data only grows a shared target directory (tens of GB); each run builds once.
export CARGO_INCREMENTAL=0
# So do the test executables of earlier builds (hundreds of MB each, a new one whenever a
# crate changes): keep the newest of each name. Cargo rebuilds any it still needs.
deps="$CARGO_TARGET_DIR/debug/deps"
if [ -d "$deps" ]; then
  find "$deps" -maxdepth 1 -type f -perm -u+x ! -name '*.*' -printf '%T@ %f\n' | sort -rn \
    | awk '{ n = $2; sub(/-[0-9a-f]+$/, "", n); if (seen[n]++) print $2 }' \
    | while read -r f; do rm -f "$deps/$f"; done
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the workspace's binaries and run the Wasm examples; build them
# before any test runs.
cargo build --workspace --bins --locked
./scripts/examples.sh >/dev/null
# The board agent (aarch64, without a compiler) that the deploy tests run under qemu-user.
./deploy/build.sh --only node-aot
# Doc tests are not run by nextest; run them first so nextest's summary closes the output.
cargo test --workspace --doc --locked
cargo nextest run --workspace --locked --run-ignored all --no-fail-fast
