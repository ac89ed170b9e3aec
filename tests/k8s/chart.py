"""Rendering and validating the Helm chart in deploy/helm/tvm.

`render(...)` runs `helm template` and returns the documents; `validate(doc)` checks one document
strictly and returns its problems (an empty list means valid):

- built-in Kubernetes kinds against the Kubernetes OpenAPI schemas of `kubernetes-validate` in
  strict mode (unknown fields fail), for each version in `KUBE_VERSIONS`;
- Istio kinds (`*.istio.io`) and the Prometheus operator's ServiceMonitor against JSON schemas of
  their CRDs (from the `cloudcoil-models-istio` / `-prometheus-operator` models, which are
  generated from the CRDs' OpenAPI), closed: every object that lists its properties rejects
  others, as the API server's strict field validation does;
- a kind with no schema at all is a failure, never a warning.

The tools come from scripts/tests.d/40-kubernetes.sh: `HELM` (environment) names the helm binary.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tvm"
# The oldest version the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())


def helm() -> str:
    """The helm binary: $HELM, else `helm` on PATH."""
    return os.environ.get("HELM", "helm")


def run_helm(*args: str) -> str:
    """Runs helm; raises `subprocess.CalledProcessError` (with its stderr) on failure."""
    return subprocess.run([helm(), *args], check=True, capture_output=True, text=True).stdout


def render(values_files: Iterable[Path] = (), sets: Iterable[str] = (), release: str = "tvm",
           namespace: str = "tvm") -> list[dict[str, Any]]:
    """`helm template` of the chart → the non-empty documents, in order."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(run_helm(*args)) if d]


def find(docs: list[dict[str, Any]], kind: str, api_group: str | None = None) -> list[dict[str, Any]]:
    """Documents of `kind` (optionally only from `api_group`, e.g. "networking.istio.io")."""
    return [d for d in docs if d.get("kind") == kind
            and (api_group is None or d.get("apiVersion", "").split("/")[0] == api_group)]


def one(docs: list[dict[str, Any]], kind: str, api_group: str | None = None) -> dict[str, Any]:
    """The single document of `kind`; AssertionError if there are none or several."""
    found = find(docs, kind, api_group)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _closed(schema: Any) -> Any:
    """A copy of `schema` in which every object schema that lists properties allows no others."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@functools.cache
def _crd_models() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) → pydantic model of a CRD-backed kind the chart may render."""
    from cloudcoil.models.istio.networking import v1 as net_v1, v1alpha3 as net_v1alpha3
    from cloudcoil.models.istio.security import v1 as sec_v1
    from cloudcoil.models.prometheus_operator import v1 as prom_v1

    models = {}
    for module, api in ((net_v1, "networking.istio.io/v1"), (net_v1alpha3, "networking.istio.io/v1alpha3"),
                        (sec_v1, "security.istio.io/v1"), (prom_v1, "monitoring.coreos.com/v1")):
        for kind in ("Gateway", "VirtualService", "DestinationRule", "EnvoyFilter", "PeerAuthentication",
                     "AuthorizationPolicy", "RequestAuthentication", "ServiceMonitor"):
            if hasattr(module, kind):
                models[(api, kind)] = getattr(module, kind)
    return models


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The closed JSON schema of a CRD-backed kind, or None when there is none."""
    model = _crd_models().get((api_version, kind))
    if model is None:
        return None
    schema = _closed(model.model_json_schema(by_alias=True))
    # The document must say what it is: apiVersion and kind are required, with these values.
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The innermost cause of an `anyOf` failure (the models' optional fields are `X or null`)."""
    while error.context:
        error = max(error.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
    return error


def validate(doc: dict[str, Any]) -> list[str]:
    """Problems of one rendered document (empty: valid). See the module docstring."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    name = f"{kind}/{doc.get('metadata', {}).get('name', '?')} ({api_version})"
    group = api_version.split("/")[0] if "/" in api_version else ""
    if group.endswith(".istio.io") or group == "monitoring.coreos.com":
        schema = crd_schema(api_version, kind)
        if schema is None:
            return [f"{name}: no schema for this kind"]
        validator = jsonschema.Draft202012Validator(schema)
        errors = [_deepest(e) for e in validator.iter_errors(copy.deepcopy(doc))]
        return [f"{name}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    problems = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for this kind in Kubernetes {version}")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: Kubernetes {version}: {'/'.join(map(str, e.path)) or '<root>'}: {e.message}")
    return problems
