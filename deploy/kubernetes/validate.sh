#!/usr/bin/env bash
# Validates the manifests in this folder against Kubernetes' own schemas, strictly (an
# unknown field fails), with kubernetes-validate from PyPI in a virtual environment of its
# own, for the versions that have native sidecars (1.29+): the oldest and the newest; then
# policy.py checks what a schema cannot (sidecar, user, read-only root, probes, grace).
#   bash deploy/kubernetes/validate.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${RELAY_KUBE_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/relay-kubernetes-validate}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q kubernetes-validate==1.37.0 2> >(grep -v "is ignored" >&2)
fi
status=0
for version in 1.29.0 1.37.0; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$here"/*.yaml \
        || status=1
done
[ "$status" = 0 ] && echo "manifests valid (strict) for Kubernetes 1.29.0 and 1.37.0"
"$venv/bin/python" "$here/policy.py" "$here"/*.yaml || status=1
exit "$status"
