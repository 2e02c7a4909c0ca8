# Shared by the HTTP benchmarks (source it): the release binaries and a graft server running
# in the background for the length of the script.
#
#   graft_binaries ROOT             sets GRAFT and LOADTEST, building them when missing
#   start_graft PORT LOG FLAGS...   `server serve --host 127.0.0.1 --port PORT FLAGS...` with
#                                   RAYON_NUM_THREADS=$THREADS, output to LOG; returns once
#                                   /health answers 200 (exits if the server dies first); sets
#                                   SERVER_PID and stops the server (SIGTERM) when the script exits

graft_binaries() {
  GRAFT=$1/target/release/server
  LOADTEST=$1/target/release/loadtest
  [ -x "$GRAFT" ] && [ -x "$LOADTEST" ] || (cd "$1" && cargo build --release -p server -p loadtest)
}

start_graft() {
  local port=$1 log=$2; shift 2
  RAYON_NUM_THREADS=${THREADS:-2} "$GRAFT" serve --host 127.0.0.1 --port "$port" "$@" > "$log" 2>&1 &
  SERVER_PID=$!
  trap 'kill -TERM $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
  for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" = 200 ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited; see $log" >&2; exit 1; }
    sleep 0.5
  done
  echo "server not healthy after 150 s; see $log" >&2
  exit 1
}
