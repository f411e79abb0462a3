#!/usr/bin/env bash
# qos_memory_soak.sh [IMEDGE] [LOADGEN]: whether the server's memory levels off under steady QoS
# load (issue 9). One server core (CPU 0, epoll, offline store on) and the load generator (CPU 1):
# CLIENTS clients (TCP, UDP, WebSocket in equal parts; default 600) in C2C pairs, 3,000 QoS msgs/s
# for SECONDS_RUN seconds (default 60); the server's RSS is printed every 5 s (every 30 s past 120 s).
# Ports 18901/17901/13000 on 127.0.0.1.
#
#   IMEDGE   server binary   [target/release/imedge]
#   LOADGEN  load generator  [target/release/imedge-loadgen]
set -euo pipefail
imedge=${1:-target/release/imedge}
loadgen=${2:-target/release/imedge-loadgen}
clients=${CLIENTS:-600}
seconds=${SECONDS_RUN:-60}
dir=$(mktemp -d /tmp/imedge-qos-soak.XXXX)
trap 'rm -rf "$dir"' EXIT

taskset -c 0 "$imedge" --threads 1 --io epoll --no-pin true --bind 127.0.0.1 --tcp-port 18901 \
  --udp-port 17901 --ws-port 13000 --data-dir "$dir/data" >"$dir/server.log" 2>&1 &
pid=$!
for ((i = 0; i < 100; i++)); do
  [ "$(grep -c 'listening' "$dir/server.log" || true)" -ge 3 ] && break
  sleep 0.1
done
(t=0; while [ "$t" -le $((seconds + 5)) ]; do
  echo "$t s: $(awk '/VmRSS/{print $2}' "/proc/$pid/status") KiB"
  step=5; [ "$t" -ge 120 ] && step=30
  sleep "$step"; t=$((t + step))
done) &
sampler=$!
taskset -c 1 "$loadgen" --host 127.0.0.1 --tcp-port 18901 --udp-port 17901 --ws-port 13000 \
  --clients "$clients" --rate 3000 --duration "${seconds}s" --grace 5s --server-pid "$pid" --quiet \
  >"$dir/loadgen.txt" 2>&1 || true
wait "$sampler"
kill "$pid"
wait "$pid" || true
grep -E '^total|^server|^result' "$dir/loadgen.txt"
