"""Starts one real `tvm serve` (real VMs) for the integration tests.

The binary is $TVM_BIN or the repository's target/release/tvm (built by scripts/test.sh).
The server runs with --max-vms 1 --queue 0, so a second concurrent execution is refused
with 429 at once: the rate-limit test relies on it, and the others run one VM at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
API_KEY = "sdk-integration-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vmm_processes(runtime_dir: str) -> int:
    """VMMs of this server: their environment names a run dir under its runtime dir (as pyrovm's reaper finds them)."""
    needle = f"TVM_RUN_DIR={runtime_dir}/".encode()
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes():
                    n += 1
            except OSError:
                pass
    return n


@pytest.fixture(scope="session")
def server():
    binary = Path(os.environ.get("TVM_BIN", REPO / "target/release/tvm"))
    if not binary.exists():
        pytest.fail(f"{binary} not found: build it with `cargo build --release -p tvm` (scripts/test.sh does)")
    port = _free_port()
    runtime_dir = tempfile.mkdtemp(prefix="tvm-sdk-")
    env = dict(os.environ, TVM_RUNTIME_DIR=runtime_dir)
    env.pop("TVM_LOG", None)
    log = open(Path(runtime_dir).with_suffix(".log"), "w+")
    proc = subprocess.Popen(
        [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--api-key", API_KEY,
         "--max-vms", "1", "--queue", "0", "--no-build-images"],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"tvm serve exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("tvm serve did not answer /healthz in 180 s")
        time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    left = os.listdir(runtime_dir)
    vmms = _vmm_processes(runtime_dir)
    shutil.rmtree(runtime_dir, ignore_errors=True)
    log.close()
    if proc.returncode == 0 and left == [] and vmms == 0:
        Path(log.name).unlink()  # kept only when the server misbehaved, for the failure's reader
    assert proc.returncode == 0, f"tvm serve exited {proc.returncode} after SIGTERM"
    assert left == [] and vmms == 0, f"left behind: run dirs {left}, VMM processes {vmms}"


@pytest.fixture
def api_key() -> str:
    return API_KEY
