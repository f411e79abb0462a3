#!/usr/bin/env bash
# The imedge benchmark: imedge on ONE core (taskset) against imedge-loadgen on the other, for a
# fixed set of scenarios, with the echo servers' floor (scripts/bench_echo.sh) measured in the
# same run so that every figure also comes as a ratio to it. Loopback only; every run bounded.
#
# Scenarios (each on a fresh server):
#   c2c      per transport (tcp, udp, ws) at each rate of RATES: 1000 clients in pairs,
#            100-byte C2C messages with QoS, open loop; loss, duplicates, p50/p99/p99.9 and the
#            server's CPU µs per delivered message (loadgen --server-pid: /proc/<pid>/stat over
#            the send phase only)
#   max      per transport: the rates of MAX_RATES in turn until one has loss, duplicates,
#            unsent messages or falls short of its rate (the highest clean one is the max
#            sustained zero-loss rate; its p99 is in the table), and the closed-loop ceiling
#            (--rate max)
#   sessions idle logged-in sessions: SESSIONS_TCP over TCP and SESSIONS_UDP over UDP; server RSS
#            before and at the peak → bytes per session; logins/s of the TCP burst
#
# Usage: scripts/bench.sh                               # everything (~15 min)
#        SCENARIOS="c2c" RATES="5000" scripts/bench.sh  # a part
# Settings (environment):
#   IO            server I/O backend: uring or epoll     [uring]
#   SCENARIOS     c2c max sessions echo                  [c2c max sessions echo]
#   TRANSPORTS    c2c/max transports                     [tcp udp ws]
#   RATES         c2c rates, messages/s                  [5000 10000 50000]
#   MAX_RATES     rates tried for the max, ascending     [30000 40000 50000 60000 70000]
#   CLIENTS       clients of c2c/max                     [1000]
#   DURATION      seconds sent per c2c/max run           [10]
#   SESSIONS_TCP  idle TCP sessions (fd cap: 20,000)     [19000]
#   SESSIONS_UDP  idle UDP sessions                      [50000]
#   SERVER_CPU / LOADGEN_CPU                             [0 / 1]
#   SKIP_BUILD=1  use target/release as it is
#   OUT           result directory                      [target/bench/imedge-<time>]
set -euo pipefail
cd "$(dirname "$0")/.."

io=${IO:-uring}
scenarios=${SCENARIOS:-"c2c max sessions echo"}
transports=${TRANSPORTS:-"tcp udp ws"}
rates=${RATES:-"5000 10000 50000"}
max_rates=${MAX_RATES:-"30000 40000 50000 60000 70000"}
clients=${CLIENTS:-1000}
duration=${DURATION:-10}
sessions_tcp=${SESSIONS_TCP:-19000}
sessions_udp=${SESSIONS_UDP:-50000}
server_cpu=${SERVER_CPU:-0}
loadgen_cpu=${LOADGEN_CPU:-1}
out=${OUT:-target/bench/imedge-$(date +%Y%m%d-%H%M%S)}

# Bounds. No send phase longer than this, whatever DURATION says.
max_duration=60
# A loadgen run may take this much longer than its send phase (logins, grace, reports).
loadgen_slack=90
# A "max sustained" step must deliver at least this share of its rate.
min_achieved=0.99
# Ports of the server under test.
tcp_port=29901 udp_port=29902 ws_port=29903

if ! [[ "$duration" =~ ^[0-9]+$ ]] || [ "$duration" -lt 1 ] || [ "$duration" -gt "$max_duration" ]; then
  echo "DURATION is whole seconds, 1..$max_duration" >&2
  exit 1
fi
for tool in jq taskset; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== building (release)" >&2
  cargo build --release -p imedge-server -p imedge-loadgen -p imedge-benches --bins >&2
fi
imedge=target/release/imedge
loadgen=target/release/imedge-loadgen
# shellcheck source=scripts/bench_lib.sh
source scripts/bench_lib.sh
bench_init "$out" bench-imedge "$imedge" "$loadgen"

# start_server TAG: a fresh imedge (own data directory) pinned to SERVER_CPU, ready. The per-session
# rate limit is off: the closed-loop ceiling runs send far more per session than any client.
start_server() {
  local tag=$1 log="$out/$1.server.log" i
  rm -rf "${data_dir:?}/$tag"
  taskset -c "$server_cpu" "$imedge" --threads 1 --io "$io" --no-pin true --bind 127.0.0.1 \
    --tcp-port "$tcp_port" --udp-port "$udp_port" --ws-port "$ws_port" \
    --session-msg-rate 0 --data-dir "$data_dir/$tag" >"$log" 2>&1 &
  server_pid=$!
  for ((i = 0; i < 100; i++)); do
    if [ "$(grep -c 'listening' "$log" || true)" -ge 3 ]; then
      return 0
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "imedge exited at start-up:" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "imedge not ready after 10 s" >&2
  exit 1
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# weights TRANSPORT: the loadgen's transport weights for one transport only.
weights() {
  case "$1" in
    tcp) echo "--tcp 1 --udp 0 --ws 0" ;;
    udp) echo "--tcp 0 --udp 1 --ws 0" ;;
    ws) echo "--tcp 0 --udp 0 --ws 1" ;;
  esac
}

# loadgen TAG ARGS...: one loadgen run pinned to LOADGEN_CPU against the running server; its
# JSON goes to $out/TAG.json, its table to $out/TAG.txt. A failing exit (loss) is recorded, not
# fatal.
loadgen() {
  local tag=$1
  shift
  local status=0
  timeout $((duration + max_duration + loadgen_slack)) taskset -c "$loadgen_cpu" "$loadgen" \
    --host 127.0.0.1 --tcp-port "$tcp_port" --udp-port "$udp_port" --ws-port "$ws_port" \
    --server-pid "$server_pid" --quiet --uid-prefix "$tag-" --json "$out/$tag.json" "$@" \
    >"$out/$tag.txt" 2>&1 || status=$?
  if [ ! -s "$out/$tag.json" ]; then
    echo "   loadgen produced no result (exit $status); see $out/$tag.txt" >&2
    return 1
  fi
  [ "$status" -eq 0 ] || echo "   loadgen exit $status (loss over --max-loss); see $out/$tag.txt" >&2
  return 0
}

# clean TAG: whether a run had no loss, no duplicates, nothing unsent, and kept its rate. (Not
# p99: on these VMs a ~100 ms stall of a virtual CPU every few seconds sets p99 at any rate; the
# table shows it, next to the echo floor's of the same run.)
clean() {
  jq -e --argjson min "$min_achieved" '
    (.config.rate.PerSecond // 0) as $rate
    | .totals | .lost == 0 and .duplicated == 0 and .unsent == 0 and .msgs_per_s >= $min * $rate
  ' "$out/$1.json" >/dev/null
}

has() { [[ " $scenarios " == *" $1 "* ]]; }

read -r load1 _ </proc/loadavg
echo "== imedge benchmark: io=$io, server on CPU $server_cpu, loadgen on CPU $loadgen_cpu, load average $load1" >&2

# c2c_run TAG TRANSPORT RATE: one C2C run on a fresh server (RATE: msgs/s, or max).
c2c_run() {
  local tag=$1 transport=$2 rate=$3 closed=()
  [ "$rate" = max ] && closed=(--window 4)
  echo "-- $tag" >&2
  start_server "$tag"
  # shellcheck disable=SC2046
  loadgen "$tag" --clients "$clients" $(weights "$transport") --rate "$rate" "${closed[@]}" \
    --duration "${duration}s" --grace 15s || true
  stop_server
}

if has c2c; then
  for transport in $transports; do
    for rate in $rates; do
      c2c_run "c2c-$transport-$rate" "$transport" "$rate"
    done
  done
fi

if has max; then
  for transport in $transports; do
    for rate in $max_rates; do
      c2c_run "max-$transport-$rate" "$transport" "$rate"
      if ! { [ -s "$out/max-$transport-$rate.json" ] && clean "max-$transport-$rate"; }; then
        break
      fi
    done
    c2c_run "ceiling-$transport" "$transport" max
  done
fi

if has sessions; then
  for spec in "tcp $sessions_tcp" "udp $sessions_udp"; do
    read -r transport count <<<"$spec"
    tag="sessions-$transport-$count"
    echo "-- $tag" >&2
    start_server "$tag"
    sleep 1
    rss_kb "$server_pid" >"$out/$tag.base_rss_kb"
    # shellcheck disable=SC2046
    loadgen "$tag" --clients "$count" $(weights "$transport") --scenario idle \
      --login-rate 100000 --duration 10s || true
    stop_server
  done
fi

if has echo; then
  echo "-- echo floor (scripts/bench_echo.sh)" >&2
  echo_transports=$(tr ' ' '\n' <<<"$transports" | sed 's/^ws$/tcp/' | sort -u | tr '\n' ' ')
  SKIP_BUILD=1 TRANSPORTS="$echo_transports" RATES="$rates" WAIT_IDLE=5 OUT="$out/echo" \
    SERVER_CPU="$server_cpu" CLIENT_CPU="$loadgen_cpu" scripts/bench_echo.sh >/dev/null
fi

# ---- the table ----
echo_json="$out/echo/results.json"
[ -s "$echo_json" ] || echo_json=/dev/null
{
  echo "# imedge benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "imedge --threads 1 --io $io on CPU $server_cpu, imedge-loadgen on CPU $loadgen_cpu;" \
    "$clients clients, 100-byte C2C QoS messages, ${duration}s open loop; load average at start $load1;" \
    "kernel $(uname -r). Ratios: imedge's figure ÷ the echo server's (imedge's own io_uring and" \
    "epoll loops in --bench-echo mode) at the same transport and rate (ws against tcp echo)," \
    "per echoed message (2 frames in + 2 out, as a C2C message with its ACK) and per frame."
  echo
  echo "| run | achieved msg/s | lost | dup | unsent | p50 µs | p99 µs | p99.9 µs | server µs/msg | ÷ uring echo µs/msg | ÷ epoll echo µs/msg | ÷ uring echo µs/frame | ÷ epoll echo µs/frame | p99 ÷ uring echo | server CPU % | loadgen CPU % |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for f in $(find "$out" -maxdepth 1 \( -name 'c2c-*.json' -o -name 'max-*.json' -o -name 'ceiling-*.json' \) | sort -V); do
    tag=$(basename "$f" .json)
    jq -r --arg tag "$tag" --slurpfile echo <(jq -c '.' "$echo_json" 2>/dev/null || echo '[]') '
      def r(x): if x == null then "–" else (x * 100 | round / 100 | tostring) end;
      def echo_of(name; transport; rate):
        [($echo[0] // [])[] | select(.server == name and .transport == transport and .rate_target == rate)][0];
      (.config.weights) as $w
      | (if $w[1] > 0 then "udp" else "tcp" end) as $et
      | (.config.rate | if type == "object" then (.PerSecond // null) else null end) as $rate
      | (if $rate == null then null else ($rate | floor) end) as $r
      | echo_of("imedge-uring"; $et; $r) as $u
      | echo_of("imedge-epoll"; $et; $r) as $e
      | (if (.server.msgs // 0) > 0 then .server.cpu_us_per_msg else null end) as $cpu
      | "| \($tag) | \(r(.totals.msgs_per_s)) | \(.totals.lost) | \(.totals.duplicated) | \(.totals.unsent) | \(.totals.latency_us.p50) | \(.totals.latency_us.p99) | \(.totals.latency_us.p999) | \(r($cpu)) | \(if $u then r($cpu / $u.server_us_per_msg) else "–" end) | \(if $e then r($cpu / $e.server_us_per_msg) else "–" end) | \(if $u then r($cpu / $u.server_us_per_frame) else "–" end) | \(if $e then r($cpu / $e.server_us_per_frame) else "–" end) | \(if $u then r(.totals.latency_us.p99 / $u.latency_us.p99) else "–" end) | \(r(.server.cpu_percent_of_core)) | \(r(.loadgen.cpu_percent_of_core)) |"
    ' "$f"
  done
  echo
  for f in $(find "$out" -maxdepth 1 -name 'sessions-*.json' | sort); do
    tag=$(basename "$f" .json)
    base=$(cat "$out/$tag.base_rss_kb")
    jq -r --arg tag "$tag" --argjson base "$base" '
      (.logins.ok) as $n
      | (.server.rss_kb_max - $base) as $grow
      | "- \($tag): \($n) sessions logged in (\(.logins.per_s | floor) logins/s, login p99 \(.logins.latency_us.p99) µs); server RSS \($base) KiB idle → \(.server.rss_kb_max) KiB at the peak: \(if $n > 0 then ($grow * 1024 / $n | floor) else "–" end) bytes per session; \(.server.fds_max) open files"
    ' "$f"
  done
  if [ -s "$out/echo/results.md" ]; then
    echo
    echo "## Echo floor (same run)"
    echo
    tail -n +3 "$out/echo/results.md"
  fi
} | tee "$out/results.md"
echo "results: $out/results.md" >&2
