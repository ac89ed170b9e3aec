"""The SDK against a real `tvm serve`: real VMs, real HTTP (see conftest.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pyroshell import (
    AsyncClient,
    AuthenticationError,
    Client,
    ExitEvent,
    Limits,
    OutputEvent,
    RateLimitError,
    ResultEvent,
    StageEvent,
    TestCase,
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


def test_tests_compile_once_run_many(server, api_key):
    # One VM: the program runs once per test; the second test's expected output is wrong.
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    with Client(server, api_key) as client:
        r = client.executions.create(
            {"main.py": code}, language="python",
            tests=[TestCase(stdin="2 3\n", expected_output="5"), {"stdin": "2 2\n", "expected_output": "5\n"}],
        )
        assert r.verdict == "ok" and r.run is None, r
        assert [(t.index, t.verdict) for t in r.tests] == [(0, "accepted"), (1, "wrong_answer")]
        assert r.tests[0].comparison == "trailing_whitespace" and r.tests[1].run.stdout == "4\n"
        assert (r.summary.total, r.summary.ran, r.summary.accepted, r.summary.failed) == (2, 2, 1, 1)
        assert not r.all_accepted and r.summary.max_wall_time_ms > 0
        # Refused before any VM: the server's validation error through the exception tree.
        with pytest.raises(UnprocessableEntityError) as e:
            client.executions.create({"main.py": code}, language="python", stdin="1 2", tests=[{"stdin": "1 2"}])
        assert e.value.code == "bad_tests" and e.value.status_code == 422


ECHO = (
    "import sys\n"
    "print('ready', flush=True)\n"
    "line = sys.stdin.readline()\n"
    "print('echo: ' + line.strip(), flush=True)\n"
    "rest = sys.stdin.read()\n"
    "print('eof after %d bytes' % len(rest), flush=True)\n"
)


def _until(session, text):
    """Events up to the stdout chunk that completes ``text``."""
    seen, out = [], ""
    for ev in session:
        seen.append(ev)
        if isinstance(ev, OutputEvent) and ev.stream == "stdout":
            out += ev.data
            if text in out:
                return seen, out
    raise AssertionError(f"{text!r} never came: {seen}")


def test_interactive_session_reads_a_line_echoes_it_and_sees_eof(server, api_key):
    limits = {"wall_time_ms": 30000, "cpu_time_ms": 20000}
    with Client(server, api_key) as client:
        # An invalid start is refused like POST /v1/executions (close 4422, no VM).
        with pytest.raises(UnprocessableEntityError) as e:
            client.sessions.start({"main.py": ECHO}, runtime="cobol-85")
        assert e.value.field == "runtime" and e.value.close_code == 4422
        with client.sessions.start({"main.py": ECHO}, language="python", limits=limits) as s:
            assert s.id and s.runtime.startswith("python-")
            seen, _ = _until(s, "ready\n")
            assert any(isinstance(ev, StageEvent) and ev.stage == "run" for ev in seen), seen
            s.send_stdin("hello\n")
            _until(s, "echo: hello\n")
            s.send_stdin(b"tail")
            s.close_stdin()
            result = s.wait()
    assert result.verdict == "ok", result
    assert result.stdout == "ready\necho: hello\neof after 4 bytes\n"


def test_async_session_signal_reaches_the_program(server, api_key):
    code = (
        "import signal, sys, time\n"
        "def on_int(n, f):\n"
        "    print('got signal', n, flush=True)\n"
        "    sys.exit(3)\n"
        "signal.signal(signal.SIGINT, on_int)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def main():
        async with AsyncClient(server, api_key) as client:
            async with client.sessions.start({"main.py": code}, language="python",
                                             limits={"wall_time_ms": 30000, "cpu_time_ms": 20000}) as s:
                events = []
                async for ev in s:
                    events.append(ev)
                    if isinstance(ev, OutputEvent) and "ready" in ev.data:
                        await s.signal("SIGINT")
                return events, s.result

    events, result = asyncio.run(main())
    exits = [ev for ev in events if isinstance(ev, ExitEvent) and ev.stage == "run"]
    assert exits and exits[0].exit_code == 3, events
    assert isinstance(events[-1], ResultEvent)
    assert result.verdict == "runtime_error" and result.exit_code == 3 and "got signal 2" in result.stdout, result


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
