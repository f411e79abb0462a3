# Shared by the benchmark scripts (sourced, not run): the binaries check, the scratch data
# directory, and stopping the server under test however the script ends.
#
# bench_init OUT PREFIX BIN...: checks that every BIN was built, creates OUT and a scratch
# directory `data_dir` (/tmp/PREFIX.XXXXXX), and arranges for `stop_server` and the scratch
# directory's removal on exit. The script sets `server_pid` when it starts a server.

stop_server() {
  if [ -n "${server_pid:-}" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}

bench_cleanup() {
  stop_server
  rm -rf "${data_dir:?}"
}

bench_init() {
  local out=$1 prefix=$2 bin
  shift 2
  for bin in "$@"; do
    [ -x "$bin" ] || { echo "missing $bin (build it, or drop SKIP_BUILD)" >&2; exit 1; }
  done
  mkdir -p "$out"
  data_dir=$(mktemp -d "/tmp/$prefix.XXXXXX")
  server_pid=
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}
