#!/usr/bin/env bash
# End-to-end tests: the real `server` binary on the real default model, driven over real HTTP
# by the official `openai` Python client and by the `loadtest` binary, and the API fuzzed
# against its OpenAPI document by schemathesis (tests/e2e). Installs the Python packages they
# need into .venv-e2e (git-ignored) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
# Re-installs when requirements.txt changed since the last install (the stamp holds its copy).
if [ ! -x .venv-e2e/bin/pytest ] || ! cmp -s tests/e2e/requirements.txt .venv-e2e/requirements.stamp; then
  [ -x .venv-e2e/bin/python ] || python3 -m venv .venv-e2e
  .venv-e2e/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
  cp tests/e2e/requirements.txt .venv-e2e/requirements.stamp
fi
cargo build -q -p server --locked
# The HTTP stack over the scripted fake engine, fuzzed by schemathesis (test_openapi.py).
cargo build -q -p server --locked --example fake_server
cargo build -q -p loadtest --locked
.venv-e2e/bin/pytest -q tests/e2e "$@"
