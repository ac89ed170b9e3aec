#!/usr/bin/env python3
"""Envoy configuration for TVM, translated from the Helm chart's own Istio resources.

Istio's control plane turns a VirtualService and a DestinationRule into Envoy configuration; this
does the same for the fields the chart uses, so a plain Envoy (Istio's data plane) in front of a few
`tvm serve` nodes behaves as the mesh would, with every number taken from the rendered chart
(`deploy/helm/tvm/values.yaml` plus overrides): one source of numbers, nothing to drift.

    render = helm template deploy/helm/tvm --set istio.enabled=true [-f overrides.yaml]
    generate.py --rendered render.yaml --endpoint 10.0.0.2:8080 ... > envoy.yaml

What maps to what:
  VirtualService http[0]   → route: prefix match, timeout, retry policy (retryOn, attempts,
                             perTryTimeout; Istio's previous-hosts predicate and 5 host selections)
  DestinationRule          → cluster: lb_policy, connect timeout, circuit breakers (connections,
                             pending requests), idle timeout, outlier detection, panic threshold
  EnvoyFilter (Retry-After)→ the HTTP connection manager's local_reply_config, verbatim
  Deployment readinessProbe→ active HTTP health check (path, interval, timeout, thresholds): what
                             kubelet readiness + endpoint removal do in a cluster
  endpoints (arguments)    → the cluster's static hosts: what EDS would deliver

Needs PyYAML. Errors (a missing resource, an unknown field value) raise `TranslateError`.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml


class TranslateError(Exception):
    """The rendered chart lacks a resource or field this translation needs."""


def seconds(duration: str) -> float:
    """An Istio/protobuf duration ("300s", "1.5s", "250ms", "2m", "1h") in seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    if not m:
        raise TranslateError(f"unsupported duration {duration!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def dur(secs: float) -> str:
    """Seconds as a protobuf JSON duration ("1.5s")."""
    return f"{secs:g}s"


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise TranslateError(f"expected one {kind} in the rendered chart (istio.enabled=true?), found {len(found)}")
    return found[0]


LB_POLICIES = {"LEAST_REQUEST": "LEAST_REQUEST", "ROUND_ROBIN": "ROUND_ROBIN", "RANDOM": "RANDOM"}


def route_config(vs: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The route configuration of the VirtualService's first HTTP route."""
    http = vs["spec"]["http"][0]
    timeout = seconds(http["timeout"])
    route: dict[str, Any] = {"cluster": cluster, "timeout": dur(timeout)}
    retries = http.get("retries")
    if retries and retries.get("attempts", 0) > 0:
        route["retry_policy"] = {
            "retry_on": retries["retryOn"],
            "num_retries": retries["attempts"],
            "per_try_timeout": dur(seconds(retries.get("perTryTimeout", http["timeout"]))),
            # What Istio adds to every retry policy: retry on another host.
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }],
            "host_selection_retry_max_attempts": 5,
        }
    matches = [{"prefix": m["uri"]["prefix"]} for m in http.get("match", [])] or [{"prefix": "/"}]
    return {
        "name": "tvm",
        "virtual_hosts": [{
            "name": "tvm",
            # The gateway's hosts, and any host so probes by address work too.
            "domains": [*vs["spec"]["hosts"], "*"],
            "routes": [{"name": http.get("name", "api"), "match": m, "route": route} for m in matches],
        }],
    }


def cluster_config(dr: dict[str, Any], deployment: dict[str, Any], endpoints: list[tuple[str, int]],
                   name: str) -> dict[str, Any]:
    """The upstream cluster: DestinationRule traffic policy + readiness probe as health check."""
    tp = dr["spec"]["trafficPolicy"]
    simple = tp["loadBalancer"]["simple"]
    if simple not in LB_POLICIES:
        raise TranslateError(f"unsupported load balancer {simple}")
    pool = tp.get("connectionPool", {})
    od = tp["outlierDetection"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "lb_policy": LB_POLICIES[simple],
        "connect_timeout": dur(seconds(pool.get("tcp", {}).get("connectTimeout", "10s"))),
        "circuit_breakers": {"thresholds": [{
            "max_connections": pool.get("tcp", {}).get("maxConnections", 2**32 - 1),
            "max_pending_requests": pool.get("http", {}).get("http1MaxPendingRequests", 2**32 - 1),
            # Retries are bounded by the route's attempts; Istio lifts Envoy's default of 3.
            "max_retries": 2**32 - 1,
        }]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": dur(seconds(pool.get("http", {}).get("idleTimeout", "3600s")))},
                "explicit_http_config": {"http_protocol_options": {}},
            },
        },
        "outlier_detection": {
            "consecutive_gateway_failure": od["consecutiveGatewayErrors"],
            "enforcing_consecutive_gateway_failure": 100,
            # consecutive5xxErrors: 0 → only gateway errors eject (Istio disables 5xx enforcement).
            "consecutive_5xx": max(od.get("consecutive5xxErrors", 0), 1),
            "enforcing_consecutive_5xx": 100 if od.get("consecutive5xxErrors", 0) else 0,
            "interval": dur(seconds(od["interval"])),
            "base_ejection_time": dur(seconds(od["baseEjectionTime"])),
            "max_ejection_percent": od["maxEjectionPercent"],
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": float(od.get("minHealthPercent", 0))}},
        "health_checks": [{
            "timeout": dur(probe.get("timeoutSeconds", 1)),
            "interval": dur(probe.get("periodSeconds", 10)),
            "unhealthy_threshold": probe.get("failureThreshold", 3),
            "healthy_threshold": probe.get("successThreshold", 1),
            "http_health_check": {"path": probe["httpGet"]["path"]},
            # A host that stops answering probes is out at once, as a pod that fails readiness.
            "no_traffic_interval": dur(probe.get("periodSeconds", 10)),
        }],
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                for host, port in endpoints
            ]}],
        },
    }
    return cluster


def local_reply_config(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The gateway's local_reply_config from the chart's EnvoyFilter patch, if any."""
    for d in docs:
        if d.get("kind") != "EnvoyFilter":
            continue
        for patch in d["spec"]["configPatches"]:
            cfg = patch["patch"]["value"].get("typed_config", {}).get("local_reply_config")
            if cfg is not None:
                return cfg
    return None


def bootstrap(docs: list[dict[str, Any]], endpoints: list[tuple[str, int]], listen: dict[str, Any],
              admin: dict[str, Any]) -> dict[str, Any]:
    """The whole Envoy bootstrap. `listen`/`admin` are Envoy address objects
    (`{"socket_address": …}` or `{"pipe": {"path": …}}`)."""
    vs = _one(docs, "VirtualService")
    dr = _one(docs, "DestinationRule")
    deployment = _one(docs, "Deployment")
    cluster = "tvm"
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress_tvm",
        "route_config": route_config(vs, cluster),
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        # Istio's gateway: the route timeout governs, no separate stream idle cut-off below it.
        "stream_idle_timeout": route_config(vs, cluster)["virtual_hosts"][0]["routes"][0]["route"]["timeout"],
    }
    lrc = local_reply_config(docs)
    if lrc is not None:
        hcm["local_reply_config"] = lrc
    return {
        "admin": {"address": admin},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": listen,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [cluster_config(dr, deployment, endpoints, cluster)],
        },
        "layered_runtime": {"layers": [{"name": "static", "static_layer": {}}]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rendered", required=True, help="output of `helm template … --set istio.enabled=true` ('-': stdin)")
    p.add_argument("--endpoint", action="append", required=True, help="HOST:PORT of a tvm serve node (repeatable)")
    p.add_argument("--listen", default="127.0.0.1:10000", help="HOST:PORT, or unix:PATH")
    p.add_argument("--admin", default="127.0.0.1:9901", help="HOST:PORT, or unix:PATH")
    a = p.parse_args(argv)
    text = sys.stdin.read() if a.rendered == "-" else open(a.rendered, encoding="utf-8").read()
    docs = [d for d in yaml.safe_load_all(text) if d]

    def addr(s: str) -> dict[str, Any]:
        if s.startswith("unix:"):
            return {"pipe": {"path": s[5:]}}
        host, port = s.rsplit(":", 1)
        return {"socket_address": {"address": host, "port_value": int(port)}}

    endpoints = [(e.rsplit(":", 1)[0], int(e.rsplit(":", 1)[1])) for e in a.endpoint]
    yaml.safe_dump(bootstrap(docs, endpoints, addr(a.listen), addr(a.admin)), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
