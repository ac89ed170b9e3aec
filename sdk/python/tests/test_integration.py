"""The SDK against a real `tvm serve`: real VMs, real HTTP (see conftest.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pyroshell import (
    AsyncClient,
    AuthenticationError,
    Client,
    Limits,
    OutputEvent,
    RateLimitError,
    ResultEvent,
    UnprocessableEntityError,
)

pytestmark = pytest.mark.integration


def test_readme_example_runs_a_program_in_a_vm(server, api_key):
    with Client(server, api_key) as client:
        result = client.executions.create({"main.py": "print(input()[::-1])"}, language="python", stdin="olleh")
    assert result.verdict == "ok" and result.stdout == "hello\n", result
    assert result.runtime.startswith("python-") and result.run.wall_time_ms > 0 and result.run.peak_memory_bytes > 0


def test_compiled_language_args_exit_code_and_exact_bytes(server, api_key):
    src = '#include <stdio.h>\nint main(int c, char **v) { printf("%s\\n", v[1]); fputs("\\xff", stderr); return 3; }\n'
    with Client(server, api_key) as client:
        r = client.executions.create({"main.c": src}, language="c", args=["hi"], limits=Limits(wall_time_ms=5000))
    assert r.verdict == "runtime_error" and r.exit_code == 3
    assert r.compile is not None and r.compile.status
    assert r.run.stdout == "hi\n" and r.run.stderr_bytes == b"\xff"


def test_compile_error_and_time_limit_are_verdicts(server, api_key):
    with Client(server, api_key) as client:
        bad = client.executions.create({"main.c": "int main( { }"}, language="c")
        assert bad.verdict == "compile_error" and bad.run is None and "error" in bad.stderr
        slow = client.executions.create({"main.py": "while True: pass"}, language="python",
                                        limits={"wall_time_ms": 3000, "cpu_time_ms": 1000})
        assert slow.verdict == "time_limit_exceeded"


def test_runtimes_and_run_code(server, api_key):
    with Client(server, api_key) as client:
        runtimes = client.runtimes.list()
        ids = {r.id for r in runtimes}
        assert "python-3.13" in ids and any(not r.available for r in runtimes)
        py = next(r for r in runtimes if r.id == "python-3.13")
        assert py.default_limits.run.wall_time_ms > 0 and py.image.state == "ready"
        r = client.executions.run_code("console.log(6 * 7)", "javascript")
    assert r.ok and r.stdout == "42\n"


def test_streaming_events_arrive_in_order_with_callbacks(server, api_key):
    code = "import sys, time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)\nprint('e', file=sys.stderr)\n"
    out, err = [], []
    with Client(server, api_key) as client:
        with client.executions.stream({"main.py": code}, language="python", on_stdout=out.append,
                                      on_stderr=err.append) as stream:
            events = list(stream)
    assert isinstance(events[-1], ResultEvent) and stream.result.ok
    assert all(isinstance(e, OutputEvent) for e in events[:-1])
    assert "".join(out) == "0\n1\n2\n" and "".join(err) == "e\n"
    assert stream.result.stdout == "0\n1\n2\n"


def test_errors_carry_the_servers_code_and_field(server, api_key):
    with Client(server, api_key) as client:
        with pytest.raises(UnprocessableEntityError) as e:
            client.executions.create({"main.py": "print(1)"}, runtime="cobol-85")
        assert e.value.field == "runtime" and e.value.code and e.value.request_id
        with pytest.raises(UnprocessableEntityError) as e:
            client.executions.create({"../x.py": "print(1)"}, language="python")
        assert e.value.field and e.value.field.startswith("files")
    with Client(server, "wrong-key") as client, pytest.raises(AuthenticationError):
        client.runtimes.list()


def test_async_client(server, api_key):
    async def main():
        async with AsyncClient(server, api_key) as client:
            r = await client.executions.create({"main.py": "print('async')"}, language="python")
            assert r.ok and r.stdout == "async\n"
            seen = []
            async with client.executions.stream({"main.py": "print('s')"}, language="python",
                                                on_stdout=seen.append) as s:
                async for _ in s:
                    pass
            assert s.result.ok and "".join(seen) == "s\n"

    asyncio.run(main())


def test_a_full_server_answers_429_which_the_client_raises_after_retries(server, api_key):
    # --max-vms 1 --queue 0: while one execution runs, another is refused at once.
    started = threading.Event()
    holder = {}

    def long_run():
        with Client(server, api_key) as c:
            with c.executions.stream({"main.py": "import time\nprint('go', flush=True)\ntime.sleep(4)"},
                                     language="python") as s:
                for ev in s:
                    if isinstance(ev, OutputEvent):
                        started.set()
                holder["r"] = s.result

    t = threading.Thread(target=long_run)
    t.start()
    try:
        assert started.wait(120), "the first execution did not start"
        with Client(server, api_key, max_retries=0) as c, pytest.raises(RateLimitError) as e:
            c.executions.create({"main.py": "print(1)"}, language="python")
        assert e.value.status_code == 429 and e.value.retry_after is not None
    finally:
        t.join(120)
    assert holder["r"].ok
