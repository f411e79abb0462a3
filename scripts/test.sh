#!/usr/bin/env bash
# Runs the whole test suite of the workspace on a fresh Debian machine with a Rust toolchain:
# installs whatever the tests need, then checks formatting and lints and runs every test
# (each bounded in time by nextest's slow-timeout, see .config/nextest.toml).
#
# The golden vectors are read from ../shared/protocol/vectors (or $IMEDGE_VECTORS).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

vectors="${IMEDGE_VECTORS:-$(cd .. && pwd)/shared/protocol/vectors}"
if [ ! -d "$vectors" ]; then
  echo "golden vectors not found at $vectors (set IMEDGE_VECTORS)" >&2
  exit 1
fi
export IMEDGE_VECTORS="$vectors"

log "toolchain"
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo --version

log "format"
cargo fmt --all -- --check

log "lints"
cargo clippy --all-targets --locked -- -D warnings
# The fuzz targets are outside default-members; make sure they still build cleanly.
cargo clippy -p imedge-fuzz --locked -- -D warnings

log "doc tests"
cargo test --doc --locked

log "tests"
cargo nextest run --profile ci --locked "$@"

# The run above drives the server's integration tests on epoll (IMEDGE_TEST_IO unset). Run them
# again on io_uring where this machine allows it: the probe answers as `--io auto` would.
log "server tests on io_uring"
cargo build --locked -q -p imedge-server --example io_uring_probe
if probe=$(cargo run --locked -q -p imedge-server --example io_uring_probe); then
  echo "$probe"
  IMEDGE_TEST_IO=uring cargo nextest run --profile ci --locked -p imedge-server -E 'kind(test)'
else
  echo "io_uring run SKIPPED: $probe"
fi
