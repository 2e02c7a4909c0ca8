#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes offline: every resource the
# kustomization lists, in strict mode (unknown fields are errors), against the schemas of
# Kubernetes $K8S_VERSION that the PyPI package kubernetes-validate bundles, and the custom
# resources in deploy/kubernetes/gateway (which it has no schema for) against the JSON
# schemas committed in deploy/kubernetes/schemas, written from their CRDs. Also fails on a
# manifest file the kustomization forgets, and first checks that broken manifests are refused
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

# Custom resources: kind -> committed schema.
.venv-deploy/bin/python - "$dir" <<'PY'
import json, pathlib, sys, yaml
import jsonschema

schemas = {"InferencePool": "inferencepool-v1.json"}
root = pathlib.Path(sys.argv[1])
def check(doc):
    schema = json.loads((root / "schemas" / schemas[doc["kind"]]).read_text())
    jsonschema.validate(doc, schema)

broken = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
          "metadata": {"name": "x"}, "spec": {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 0}],
                                              "endpointPickerRef": {"name": "e"}}}
try:
    check(broken)
    sys.exit("the InferencePool schema accepted port 0; the check is broken")
except jsonschema.ValidationError:
    pass
count = 0
for path in sorted((root / "gateway").glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] not in schemas:
            sys.exit(f"{path}: no committed schema for kind {doc['kind']}")
        try:
            check(doc)
        except jsonschema.ValidationError as e:
            sys.exit(f"{path}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
        count += 1
print(f"deploy/kubernetes/gateway: {count} custom resources valid against their CRD schemas")
PY
