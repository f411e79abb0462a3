#!/usr/bin/env bash
# C2C QoS between UDP clients over a lossy link: imedge behind imedge-lossy (DROP % of the
# datagrams dropped each way, each client's first datagram spared so that it logs in), the
# loadgen's UDP clients in front. Prints the loadgen's table (sent, delivered, lost, wire
# duplicates, application duplicates) and the proxy's counts.
#
#   scripts/lossy_qos.sh                        # the reference's resends: 2 (SDK) / 1 (server)
#   RESENDS=8 INTERVAL=500 scripts/lossy_qos.sh # --qos-resends 8 --qos-resend-interval 500, both ends
#
# Environment: RESENDS, INTERVAL (ms; unset = the reference's schedule), DROP (percent, 10),
# CLIENTS (200), RATE (msgs/s, 300), DURATION (15s), GRACE (25s), SEED (1), PROFILE (debug or
# release: which target/ binaries to use; built if missing), JSON (a path for the loadgen's JSON).
set -euo pipefail
cd "$(dirname "$0")/.."

DROP="${DROP:-10}"
CLIENTS="${CLIENTS:-200}"
RATE="${RATE:-300}"
DURATION="${DURATION:-15s}"
GRACE="${GRACE:-25s}"
SEED="${SEED:-1}"
PROFILE="${PROFILE:-debug}"
SERVER_UDP=17901
PROXY_UDP=27901

if [ "$PROFILE" = release ]; then
  cargo build --release -q -p imedge-server -p imedge-loadgen -p imedge-lossy
else
  cargo build -q -p imedge-server -p imedge-loadgen -p imedge-lossy
fi
bin="target/$PROFILE"

qos_flags=()
[ -n "${RESENDS:-}" ] && qos_flags+=(--qos-resends "$RESENDS")
[ -n "${INTERVAL:-}" ] && qos_flags+=(--qos-resend-interval "$INTERVAL")

data_dir="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data_dir"
}
trap cleanup EXIT

"$bin/imedge" --bind 127.0.0.1 --udp-port "$SERVER_UDP" --tcp-port 18901 --ws-port 13000 \
  --threads 1 --data-dir "$data_dir" "${qos_flags[@]}" >"$data_dir/server.log" 2>&1 &
pids+=($!)
"$bin/imedge-lossy" --upstream "127.0.0.1:$SERVER_UDP" --listen "127.0.0.1:$PROXY_UDP" \
  --drop "$DROP" --spare-first 1 --seed "$SEED" --report-secs 1 2>"$data_dir/proxy.log" &
pids+=($!)
sleep 1

json_flags=()
[ -n "${JSON:-}" ] && json_flags+=(--json "$JSON")
status=0
"$bin/imedge-loadgen" --udp-port "$PROXY_UDP" --tcp 0 --udp 1 --ws 0 --clients "$CLIENTS" \
  --scenario c2c --rate "$RATE" --duration "$DURATION" --grace "$GRACE" --max-loss 100% \
  "${qos_flags[@]}" "${json_flags[@]}" || status=$?
sleep 1.5
echo "proxy: $(tail -n 1 "$data_dir/proxy.log")"
exit "$status"
