#!/usr/bin/env bash
# qos_memory_soak.sh [IMEDGE] [LOADGEN]: whether the server's memory levels off under steady QoS
# load (issue 9). One server core (CPU 0, epoll, offline store on) and the load generator (CPU 1):
# 600 clients (TCP, UDP, WebSocket in equal parts) in C2C pairs, 3,000 QoS msgs/s for 60 s; the
# server's RSS is printed every 5 s. Ports 18901/17901/13000 on 127.0.0.1.
#
#   IMEDGE   server binary   [target/release/imedge]
#   LOADGEN  load generator  [target/release/imedge-loadgen]
set -euo pipefail
imedge=${1:-target/release/imedge}
loadgen=${2:-target/release/imedge-loadgen}
dir=$(mktemp -d /tmp/imedge-qos-soak.XXXX)
trap 'rm -rf "$dir"' EXIT

taskset -c 0 "$imedge" --threads 1 --io epoll --no-pin true --bind 127.0.0.1 --tcp-port 18901 \
  --udp-port 17901 --ws-port 13000 --data-dir "$dir/data" >"$dir/server.log" 2>&1 &
pid=$!
for ((i = 0; i < 100; i++)); do
  [ "$(grep -c 'listening' "$dir/server.log" || true)" -ge 3 ] && break
  sleep 0.1
done
(for i in $(seq 0 13); do
  echo "$((i * 5)) s: $(awk '/VmRSS/{print $2}' "/proc/$pid/status") KiB"
  sleep 5
done) &
sampler=$!
taskset -c 1 "$loadgen" --host 127.0.0.1 --tcp-port 18901 --udp-port 17901 --ws-port 13000 \
  --clients 600 --rate 3000 --duration 60s --grace 5s --server-pid "$pid" --quiet \
  >"$dir/loadgen.txt" 2>&1 || true
wait "$sampler"
kill "$pid"
wait "$pid" || true
grep -E '^total|^server|^result' "$dir/loadgen.txt"
