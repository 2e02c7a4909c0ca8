#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes offline: every resource the
# kustomization lists, in strict mode (unknown fields are errors), against the schemas of
# Kubernetes $K8S_VERSION that the PyPI package kubernetes-validate bundles. Also fails on a
# manifest file the kustomization forgets, and first checks that a broken manifest is refused
# (so a validator that accepts everything cannot pass). Installs into .venv-deploy.
#
#   scripts/deploy/validate-k8s.sh            # K8S_VERSION=1.33.0
set -euo pipefail
cd "$(dirname "$0")/../.."
K8S_VERSION=${K8S_VERSION:-1.33.0}
if [ ! -x .venv-deploy/bin/kubernetes-validate ] || ! cmp -s deploy/requirements.txt .venv-deploy/requirements.stamp; then
  [ -x .venv-deploy/bin/python ] || python3 -m venv .venv-deploy
  .venv-deploy/bin/pip install -q --disable-pip-version-check -r deploy/requirements.txt
  cp deploy/requirements.txt .venv-deploy/requirements.stamp
fi
validator=$PWD/.venv-deploy/bin/kubernetes-validate
validate() { "$validator" -k "$K8S_VERSION" --strict --quiet "$@"; }

broken=$(mktemp --suffix=.yaml)
trap 'rm -f "$broken"' EXIT
printf 'apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz: []\n' > "$broken"
refusal=$(validate "$broken" 2>&1 || true)
if ! grep -q "'portz' was unexpected" <<< "$refusal"; then
  echo "kubernetes-validate did not refuse a Service with an unknown field; the check is broken" >&2
  exit 1
fi

dir=deploy/kubernetes
resources=$(.venv-deploy/bin/python - "$dir/kustomization.yaml" <<'PY'
import sys, yaml
print("\n".join(yaml.safe_load(open(sys.argv[1]))["resources"]))
PY
)
for f in "$dir"/*.yaml; do
  name=$(basename "$f")
  [ "$name" = kustomization.yaml ] && continue
  grep -qx "$name" <<< "$resources" || { echo "$f is not listed in $dir/kustomization.yaml" >&2; exit 1; }
done
(cd "$dir" && validate $resources)
echo "deploy/kubernetes: $(wc -w <<< "$resources") manifests valid against Kubernetes $K8S_VERSION"
