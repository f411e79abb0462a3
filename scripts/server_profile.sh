#!/usr/bin/env bash
# Where a C2C message's server CPU goes: imedge on one core (CPU 0) under an open-loop C2C load
# from imedge-loadgen (CPU 1); over a window after the warm-up it reads the server's user and
# system time and its threads' context switches from /proc and prints them per message, and with
# PERF=1 records the window with `perf record -g` and prints the split by object and the top
# symbols. Loopback only; bounded by DURATION.
#
# Usage: scripts/server_profile.sh [RATE] [TRANSPORT]     # defaults: 5000 tcp
# Settings (environment): IO [uring], CLIENTS [1000], WARMUP [4] and WINDOW [8] seconds,
#   PERF=1, SKIP_BUILD=1, OUT [target/bench/profile-<time>]
set -euo pipefail
cd "$(dirname "$0")/.."

rate=${1:-5000}
transport=${2:-tcp}
io=${IO:-uring}
clients=${CLIENTS:-1000}
warmup=${WARMUP:-4}
window=${WINDOW:-8}
out=${OUT:-target/bench/profile-$(date +%Y%m%d-%H%M%S)}
tcp_port=29911 udp_port=29912 ws_port=29913

case "$transport" in
  tcp) weights="--tcp 1 --udp 0 --ws 0" ;;
  udp) weights="--tcp 0 --udp 1 --ws 0" ;;
  ws) weights="--tcp 0 --udp 0 --ws 1" ;;
  *) echo "TRANSPORT is tcp, udp or ws" >&2; exit 1 ;;
esac
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -p imedge-server -p imedge-loadgen >&2
fi
imedge=target/release/imedge
loadgen=target/release/imedge-loadgen
# shellcheck source=scripts/bench_lib.sh
source scripts/bench_lib.sh
bench_init "$out" bench-profile "$imedge" "$loadgen"

taskset -c 0 "$imedge" --threads 1 --io "$io" --no-pin true --bind 127.0.0.1 \
  --tcp-port "$tcp_port" --udp-port "$udp_port" --ws-port "$ws_port" \
  --session-msg-rate 0 --data-dir "$data_dir/data" >"$out/server.log" 2>&1 &
server_pid=$!
sleep 1
# shellcheck disable=SC2086
timeout $((warmup + window + 60)) taskset -c 1 "$loadgen" --host 127.0.0.1 \
  --tcp-port "$tcp_port" --udp-port "$udp_port" --ws-port "$ws_port" --clients "$clients" \
  $weights --rate "$rate" --duration "$((warmup + window + 2))s" --quiet \
  --json "$out/loadgen.json" >"$out/loadgen.txt" 2>&1 &
loadgen_pid=$!

# cpu: "utime stime" in clock ticks; switches: voluntary + involuntary over all threads.
cpu() { awk '{ print $14, $15 }' "/proc/$server_pid/stat"; }
switches() { cat /proc/"$server_pid"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }'; }

sleep "$warmup"
read -r u1 s1 < <(cpu)
c1=$(switches)
if [ "${PERF:-0}" = 1 ]; then
  perf record -F 2000 -g -p "$server_pid" -o "$out/perf.data" -- sleep "$window" 2>/dev/null >&2
else
  sleep "$window"
fi
read -r u2 s2 < <(cpu)
c2=$(switches)
wait "$loadgen_pid" || true
stop_server

ticks=$(getconf CLK_TCK)
msgs=$((rate * window))
awk -v u=$((u2 - u1)) -v s=$((s2 - s1)) -v c=$((c2 - c1)) -v t="$ticks" -v m="$msgs" \
  -v r="$rate" -v tr="$transport" -v w="$window" 'BEGIN {
    printf "%s at %d msgs/s, %d s window: user %.1f µs + system %.1f µs per message, %.2f context switches per message\n",
      tr, r, w, u * 1e6 / t / m, s * 1e6 / t / m, c / m
  }'
grep -E "^total|^result" "$out/loadgen.txt" || true
if [ "${PERF:-0}" = 1 ]; then
  perf report -i "$out/perf.data" --no-children --sort dso 2>/dev/null | grep -E '^ +[0-9]' | head -5
  perf report -i "$out/perf.data" --no-children --sort sym 2>/dev/null | grep -E '^ +[0-9]' | head -15
fi
