#!/usr/bin/env bash
# The echo benchmark ("physical limit"): what one echoed frame costs the server's CPU on imedge's
# own io_uring loop, its epoll loop (`imedge --bench-echo`) and a plain tokio server
# (`echo-tokio`), all driven by the same open-loop client (`echo-load`) and measured the same way:
# server CPU µs per message (2 frames in + 2 out) and per frame, and latency percentiles at the
# same rates. Loopback only.
#
# Each run starts a fresh server pinned to one CPU and the client pinned to another, warms up,
# measures, then stops the server. One table goes to stdout; the per-run JSON, a combined
# results.json and a results.md land in target/bench/echo-<time>/.
#
# Usage: scripts/bench_echo.sh                       # tcp, rates 5000 40000 100000
#        TRANSPORTS="tcp udp" RATES="5000 40000" scripts/bench_echo.sh
# Columns: achieved = echoed messages/s in the window; server µs/msg and µs/frame = server CPU
# (utime+stime, all threads) over the window / messages (frames) echoed in it; p50..p99.9 =
# latency from each message's intended send time to its 2nd echo; lost = no 2 echoes by the end
# + 1 s; client CPU% (near 100 = client-bound); send-lag p99 = how late the client sent; other
# CPU% = what other processes used meanwhile (noise); retrans|rcvbuf drops = machine-wide TCP
# retransmissions (tcp) or UDP receive-buffer drops (udp) in the window.
# Settings (environment):
#   SERVERS      servers to run            [imedge-uring imedge-epoll tokio]
#   TRANSPORTS   tcp and/or udp            [tcp]
#   RATES        messages/s, total         [5000 40000 100000]
#   CONNECTIONS  client connections        [1000]
#   SIZE         body bytes per frame      [100]
#   WARMUP       seconds before measuring  [2]
#   DURATION     seconds measured          [8]
#   SERVER_CPU   CPU the server runs on    [0]
#   CLIENT_CPU   CPU the client runs on    [1]
#   BASE_PORT    first port used           [19100]
#   WAIT_IDLE    seconds to wait, before each run, for other processes to go quiet [30]
#   SKIP_BUILD   1: use the binaries in target/release as they are
#   OUT          result directory          [target/bench/echo-<time>]
set -euo pipefail
cd "$(dirname "$0")/.."

servers=${SERVERS:-"imedge-uring imedge-epoll tokio"}
transports=${TRANSPORTS:-tcp}
rates=${RATES:-"5000 40000 100000"}
connections=${CONNECTIONS:-1000}
size=${SIZE:-100}
warmup=${WARMUP:-2}
duration=${DURATION:-8}
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
port=${BASE_PORT:-19100}
wait_idle=${WAIT_IDLE:-30}
out=${OUT:-target/bench/echo-$(date +%Y%m%d-%H%M%S)}

# Bounds: no run may go on for long, whatever the settings say.
max_seconds=120
# How long a server may take to print its "listening" lines (0.1 s polls).
ready_polls=100
# Extra seconds the client may take beyond warm-up + measurement (connecting 1000 sockets, the
# 1 s grace for late echoes, writing results) before `timeout` stops it.
client_slack=30
# "Quiet": the whole machine less than this % busy over half a second.
idle_pct=10

for value in "$warmup" "$duration"; do
  if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "$value" -gt "$max_seconds" ]; then
    echo "WARMUP and DURATION are whole seconds, at most $max_seconds" >&2
    exit 1
  fi
done
command -v jq >/dev/null || { echo "jq is needed for the result table" >&2; exit 1; }
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed to pin processes" >&2; exit 1; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== building (release)" >&2
  cargo build --release -p imedge-server -p imedge-benches --bins >&2
fi
imedge=target/release/imedge
tokio_echo=target/release/echo-tokio
load=target/release/echo-load
# shellcheck source=scripts/bench_lib.sh
source scripts/bench_lib.sh
bench_init "$out" bench-echo "$imedge" "$tokio_echo" "$load"

# start_server NAME TCP_PORT UDP_PORT LOG: starts it pinned, sets server_pid, waits until ready.
start_server() {
  local name=$1 tcp=$2 udp=$3 log=$4
  case "$name" in
    imedge-uring | imedge-epoll)
      # --no-pin: taskset pins every server the same way (imedge would pin itself to CPU 0).
      taskset -c "$server_cpu" "$imedge" --bench-echo --threads 1 --io "${name#imedge-}" \
        --no-pin true --bind 127.0.0.1 --tcp-port "$tcp" --udp-port "$udp" --ws-port off \
        --offline-store false --data-dir "$data_dir/$name" >"$log" 2>&1 &
      ;;
    tokio)
      taskset -c "$server_cpu" "$tokio_echo" --bind 127.0.0.1 --tcp-port "$tcp" --udp-port "$udp" \
        >"$log" 2>&1 &
      ;;
    *)
      echo "unknown server $name (imedge-uring, imedge-epoll, tokio)" >&2
      exit 1
      ;;
  esac
  server_pid=$!
  local i
  for ((i = 0; i < ready_polls; i++)); do
    # Ready once both the TCP and the UDP "listening" lines are out.
    if [ "$(grep -ci listening "$log" || true)" -ge 2 ]; then
      return 0
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "$name exited at start-up; its log ($log):" >&2
      cat "$log" >&2
      server_pid=
      exit 1
    fi
    sleep 0.1
  done
  echo "$name not ready after $((ready_polls / 10)) s; its log ($log):" >&2
  cat "$log" >&2
  exit 1
}

# busy_pct: % of all CPUs busy over the next half second (from /proc/stat).
busy_pct() {
  local u n s i w q sq st b1 t1 b2 t2
  read -r _ u n s i w q sq st _ </proc/stat
  b1=$((u + n + s + q + sq + st)) t1=$((u + n + s + i + w + q + sq + st))
  sleep 0.5
  read -r _ u n s i w q sq st _ </proc/stat
  b2=$((u + n + s + q + sq + st)) t2=$((u + n + s + i + w + q + sq + st))
  echo $((100 * (b2 - b1) / (t2 - t1 > 0 ? t2 - t1 : 1)))
}

# wait_quiet: waits (at most WAIT_IDLE s) until other processes leave the CPUs alone.
wait_quiet() {
  local tries busy=0
  for ((tries = 0; tries < wait_idle * 2; tries++)); do
    busy=$(busy_pct)
    [ "$busy" -lt "$idle_pct" ] && return 0
  done
  [ "$wait_idle" -gt 0 ] && echo "   warning: machine still ${busy}% busy after ${wait_idle}s; running anyway" >&2
  return 0
}

read -r load1 _ </proc/loadavg
echo "== echo benchmark: servers [$servers] transports [$transports] rates [$rates]" >&2
echo "   $connections connections, $size-byte bodies, ${warmup}s warm-up + ${duration}s measured," \
  "server on CPU $server_cpu, client on CPU $client_cpu; load average $load1" >&2
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
  echo "   warning: the machine is busy (load $load1); CPU figures will be noisy" >&2
fi

run=0
for transport in $transports; do
  for name in $servers; do
    for rate in $rates; do
      tcp_port=$port udp_port=$((port + 1))
      port=$((port + 2))
      run=$((run + 1))
      tag=$(printf '%02d-%s-%s-%s' "$run" "$name" "$transport" "$rate")
      log="$out/$tag.server.log"
      wait_quiet
      start_server "$name" "$tcp_port" "$udp_port" "$log"
      if [ "$transport" = udp ]; then addr=127.0.0.1:$udp_port; else addr=127.0.0.1:$tcp_port; fi
      echo "-- $name $transport $rate msg/s" >&2
      status=0
      timeout $((warmup + duration + client_slack)) taskset -c "$client_cpu" "$load" \
        --addr "$addr" --transport "$transport" --connections "$connections" --rate "$rate" \
        --warmup "${warmup}s" --duration "${duration}s" --size "$size" \
        --server-pid "$server_pid" --label "$name" \
        --json "$out/$tag.json" >&2 || status=$?
      stop_server
      if [ "$status" -ne 0 ]; then
        echo "   echo-load failed (exit $status); see $log" >&2
      fi
    done
  done
done

# One table from the per-run JSON files, in the order they ran (their names start with the run).
mapfile -t runs < <(find "$out" -maxdepth 1 -name '[0-9]*-*.json' | sort)
if [ "${#runs[@]}" -eq 0 ]; then
  echo "no run produced results" >&2
  exit 1
fi
jq -s '.' "${runs[@]}" >"$out/results.json"
table=$(jq -r '
  def f(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  ["server", "transport", "rate target", "achieved", "server µs/msg", "µs/frame", "p50 µs",
   "p99 µs", "p99.9 µs", "lost", "client CPU%", "send-lag p99 µs", "other CPU%", "retrans|rcvbuf drops"],
  (.[] | [.server, .transport, (.rate_target | tostring), (.achieved | f(0)),
          (.server_us_per_msg | f(2)), (.server_us_per_frame | f(2)), (.latency_us.p50 | f(0)),
          (.latency_us.p99 | f(0)), (.latency_us.p99_9 | f(0)), (.lost | tostring),
          (.client_cpu_pct | f(0)), (.send_lag_us.p99 | f(0)), (.other_cpu_pct | f(0)),
          (if .transport == "udp" then .udp_rcvbuf_drops else .tcp_retrans end | f(0))])
  | join("\t")' "$out/results.json")
echo
printf '%s\n' "$table" | column -t -s $'\t'
{
  echo "# Echo benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "$connections connections, $size-byte bodies, 2 frames in + 2 out per message," \
    "${warmup}s warm-up + ${duration}s measured; server on CPU $server_cpu, client on CPU" \
    "$client_cpu; load average at start $load1; kernel $(uname -r)."
  echo
  printf '%s\n' "$table" | head -1 | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
  printf '%s\n' "$table" | head -1 | sed 's/[^\t]*/---/g; s/\t/ | /g; s/^/| /; s/$/ |/'
  printf '%s\n' "$table" | tail -n +2 | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
  jq -r '.[] | select(.warnings | length > 0)
    | "- \(.server) \(.transport) \(.rate_target): \(.warnings | join("; "))"' "$out/results.json"
} >"$out/results.md"
echo
echo "results: $out/results.md, $out/results.json" >&2
