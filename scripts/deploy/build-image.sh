#!/usr/bin/env bash
# Builds graft's container image with podman from deploy/container/Containerfile: stages a
# root file system (the server binary with its debug info stripped, the shared libraries ldd
# lists, the default model, /etc/passwd with user graft 10001) and builds FROM scratch, so no
# base image is pulled. `--isolation chroot` because this sandbox's podman can run no
# container for RUN steps (the Containerfile has none).
#
#   scripts/deploy/build-image.sh                 # graft:<version>, release binary
#   PROFILE=debug TAG=graft:test scripts/deploy/build-image.sh   # CI: the test build's binary
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-release}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' server/Cargo.toml | head -1)
TAG=${TAG:-graft:$version}
command -v podman > /dev/null || { echo "podman is needed (Debian: apt-get install podman)" >&2; exit 1; }

case $PROFILE in
  release) cargo build -q --release -p server --locked ;;
  debug) cargo build -q -p server --locked ;;
  *) echo "PROFILE is release or debug" >&2; exit 1 ;;
esac
bin=target/$PROFILE/server
model=$("$bin" fetch)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/rootfs
mkdir -p "$root/usr/local/bin" "$root/opt/graft/models" "$root/etc" "$root/tmp" "$root/proc"
strip --strip-debug -o "$root/usr/local/bin/server" "$bin"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  cp --parents -L "$lib" "$root/"
done
cp "$model" "$root/opt/graft/models/"
printf 'root:x:0:0:root:/:/sbin/nologin\ngraft:x:10001:10001:graft:/tmp:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\ngraft:x:10001:\n' > "$root/etc/group"
# Everything readable by the image's user (the model cache's file is private to its owner).
chmod -R a+rX "$root"
chmod 1777 "$root/tmp"
cp deploy/container/Containerfile "$stage/"
podman build -q --isolation chroot --format docker -f "$stage/Containerfile" -t "$TAG" "$stage"
echo "built $TAG ($(podman image inspect --format '{{.Size}}' "$TAG") bytes)"
