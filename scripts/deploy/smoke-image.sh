#!/usr/bin/env bash
# Runs graft from its image's unpacked root file system and checks it serves: `podman run`
# cannot start containers in this sandbox, so the image is exported, unpacked, and its
# entrypoint started under chroot as the image's user with the image's environment (only
# the port changed). Checks /live, /health, one completion, the image's health-check command,
# and a clean exit on SIGTERM. Needs root (chroot, mount).
#
#   scripts/deploy/smoke-image.sh graft:test
set -euo pipefail
TAG=${1:?usage: smoke-image.sh IMAGE}
work=$(mktemp -d)
root=$work/rootfs
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2> /dev/null || true
  umount "$root/proc" 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ctr=$(podman create "$TAG")
mkdir -p "$root"
podman export "$ctr" | tar -x -C "$root"
podman rm -f "$ctr" > /dev/null
# As a container runtime would; the server also runs without it (checked), so a sandbox that
# forbids the mount only loses the check's fidelity.
mount -t proc proc "$root/proc" 2> /dev/null || echo "note: /proc not mounted (not permitted here)" >&2

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mapfile -t env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$TAG" | sed '/^$/d')
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
entry=$(podman image inspect --format '{{range .Config.Entrypoint}}{{.}} {{end}}{{range .Config.Cmd}}{{.}} {{end}}' "$TAG")
# shellcheck disable=SC2086  # the entrypoint and command are words
env -i "${env[@]}" GRAFT_PORT="$port" chroot --userspec="$user" "$root" $entry > "$work/server.log" 2>&1 &
pid=$!

url=http://127.0.0.1:$port
for _ in $(seq 1 240); do
  curl -sf "$url/health" > /dev/null && break
  kill -0 "$pid" 2> /dev/null || { cat "$work/server.log"; echo "the server exited" >&2; exit 1; }
  sleep 0.5
done
curl -sf "$url/live" | grep -q alive
curl -sf "$url/health" | grep -q ok
reply=$(curl -sf "$url/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}')
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["usage"]["completion_tokens"] == 4, r; print("completion:", repr(r["choices"][0]["text"]))' "$reply"
# The image's HEALTHCHECK command, as the runtime would run it.
env -i "${env[@]}" GRAFT_PORT="$port" chroot --userspec="$user" "$root" /usr/local/bin/server probe --path /health
kill -TERM "$pid"
wait "$pid"
pid=
echo "$TAG: served from its root file system as user $user, exited 0 on SIGTERM"
