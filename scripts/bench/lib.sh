# Shared by the HTTP benchmarks (source it): the release binaries and a graft server running
# in the background for the length of the script.
#
#   graft_binaries ROOT             sets GRAFT and LOADTEST, building them when missing
#   start_graft PORT LOG FLAGS...   `server serve --host 127.0.0.1 --port PORT FLAGS...` with
#                                   RAYON_NUM_THREADS=$THREADS, output to LOG; returns once
#                                   /health answers 200 (exits if the server dies first); sets
#                                   SERVER_PID and stops the server (SIGTERM) when the script exits
#   wait_health PORT                for a server started as SERVER_PID: returns once /health
#                                   answers 200, fails if it exits or takes over 150 s
#   stop_server                     stops SERVER_PID (SIGTERM, then SIGKILL after 10 s), for
#                                   scripts that start and stop servers in turn

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

wait_health() {  # port
  for _ in $(seq 300); do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited before it was ready" >&2; return 1; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/health")" = 200 ] && return 0
    sleep 0.5
  done
  echo "server not ready after 150 s" >&2; return 1
}

stop_server() {
  if [ -n "${SERVER_PID:-}" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
