#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for DURATION seconds each (default 600), one after the
# other, each on its committed corpus (fuzz/corpus/<target>, seeded by fuzz/seed_corpus.py).
# Needs the nightly toolchain; installs cargo-fuzz if missing. A crash stops the script with
# libFuzzer's artifact under fuzz/artifacts/<target>/: commit it as a regression test.
#
# Usage: scripts/fuzz.sh [DURATION] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${1:-600}"
# The release profile's fat LTO breaks linking sanitizer-instrumented binaries
# (undefined __sancov_gen_ symbols); fuzz builds don't need it.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
shift || true
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  printf '\n== %s (%ss)\n' "$target" "$duration"
  # -rss_limit_mb: a target must not need more than this on any input (limits are the point).
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$duration" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E '^(#[0-9]+ +DONE|stat::|==[0-9]+==|SUMMARY|artifact_prefix|Test unit written)' || true
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "fuzz target $target failed: see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
