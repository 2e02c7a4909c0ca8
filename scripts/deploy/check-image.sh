#!/usr/bin/env bash
# The test suite's container check: installs podman if missing (Debian, as root), builds the
# image from the test build's binary and runs it from its unpacked root file system
# (scripts/deploy/smoke-image.sh), then removes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v podman > /dev/null; then
  [ "$(id -u)" = 0 ] || { echo "podman is missing and installing it needs root" >&2; exit 1; }
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends podman > /dev/null; }
  install || { apt-get update -q > /dev/null && install; }
fi
tag=graft:ci-$$
PROFILE=debug TAG=$tag scripts/deploy/build-image.sh
trap 'podman rmi -f "$tag" > /dev/null 2>&1 || true' EXIT
scripts/deploy/smoke-image.sh "$tag" 2> >(grep -v 'level=error msg="Removing timer' >&2)
