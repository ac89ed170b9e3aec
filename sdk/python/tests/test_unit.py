"""Client behaviour against httpx's mock transport: no server, no network."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Callable, Iterator, List

import httpx
import pydantic
import pytest

import pyroshell
from pyroshell import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    Client,
    InternalServerError,
    Limits,
    OutputEvent,
    RateLimitError,
    ResultEvent,
    ServiceUnavailableError,
    StreamIdleTimeoutError,
    UnprocessableEntityError,
)
from pyroshell._files import to_body
from pyroshell._sse import SSEDecoder

RESULT = {
    "id": "abc",
    "verdict": "ok",
    "runtime": "python-3.13",
    "compile": None,
    "run": {
        "status": "exited",
        "exit_code": 0,
        "signal": None,
        "stdout": "hello\n",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "wall_time_ms": 12,
        "cpu_time_ms": 10,
        "peak_memory_bytes": 1 << 20,
    },
    "boot_ms": 900,
    "queue_ms": 0,
    "total_ms": 1000,
    "accel": "tcg",
    "pooled": False,
}


def client_with(handler: Callable[[httpx.Request], httpx.Response], **kw) -> Client:
    kw.setdefault("max_retry_wait", 5)
    return Client("http://tvm.test", "k", transport=httpx.MockTransport(handler), **kw)


def error(status: int, code: str, message: str, field=None, headers=None) -> httpx.Response:
    body = {"error": {"code": code, "message": message}}
    if field:
        body["error"]["field"] = field
    return httpx.Response(status, json=body, headers={"x-request-id": "req-1", **(headers or {})})


def test_create_sends_the_documented_body_and_parses_the_result():
    seen = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["auth"] = req.headers["authorization"]
        seen["body"] = json.loads(req.content)
        return httpx.Response(200, json=RESULT)

    with client_with(handler) as c:
        r = c.executions.create(
            {"main.py": "print('hello')", "data.bin": b"\x00\xff"},
            language="python",
            stdin=b"\x01",
            args=["a", 2],
            limits=Limits(wall_time_ms=2000),
            compile_limits={"memory_bytes": 1 << 20},
        )
    assert seen["auth"] == "Bearer k"
    b = seen["body"]
    assert b["language"] == "python" and "runtime" not in b
    assert b["files"][0] == {"name": "main.py", "content": "print('hello')"}
    assert b["files"][1] == {"name": "data.bin", "content": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64"}
    assert b["stdin"] == "AQ==" and b["stdin_encoding"] == "base64"
    assert b["args"] == ["a", "2"]
    assert b["run_limits"] == {"wall_time_ms": 2000}
    assert b["compile_limits"] == {"memory_bytes": 1 << 20}
    assert r.ok and r.verdict == "ok" and r.stdout == "hello\n" and r.exit_code == 0
    assert r.run.stdout_bytes == b"hello\n"


def test_a_failing_program_is_a_verdict_not_an_exception():
    res = dict(RESULT, verdict="runtime_error")
    res["run"] = dict(RESULT["run"], exit_code=3, stdout="\ufffd", stdout_base64=base64.b64encode(b"\xff").decode())
    with client_with(lambda req: httpx.Response(200, json=res)) as c:
        r = c.executions.create({"a.py": "x"}, runtime="python")
    assert not r.ok and r.verdict == "runtime_error" and r.exit_code == 3
    assert r.run.stdout_bytes == b"\xff"


def test_unknown_fields_from_a_newer_server_are_kept():
    res = dict(RESULT, started_from="template")
    with client_with(lambda req: httpx.Response(200, json=res)) as c:
        r = c.executions.create({"a.py": "x"}, runtime="python")
    assert r.model_extra["started_from"] == "template"


@pytest.mark.parametrize(
    "status,cls",
    [(422, UnprocessableEntityError), (401, AuthenticationError), (500, InternalServerError), (400, pyroshell.BadRequestError),
     (413, pyroshell.PayloadTooLargeError), (415, pyroshell.UnsupportedMediaTypeError), (408, pyroshell.RequestTimeoutError)],
)
def test_errors_map_by_status_with_the_servers_fields(status, cls):
    calls = []

    def handler(req):
        calls.append(1)
        return error(status, "unknown_runtime", "no runtime named cobol", field="runtime")

    with client_with(handler) as c, pytest.raises(cls) as e:
        c.executions.create({"a.cob": "x"}, runtime="cobol")
    assert e.value.status_code == status and e.value.code == "unknown_runtime"
    assert e.value.field == "runtime" and e.value.message == "no runtime named cobol"
    assert e.value.request_id == "req-1"
    assert "unknown_runtime" in str(e.value) and "runtime" in str(e.value)
    assert len(calls) == 1, "never retried"


def test_503_and_429_are_retried_after_retry_after():
    answers = [error(503, "draining", "draining", headers={"retry-after": "0"}),
               error(429, "queue_full", "busy", headers={"retry-after": "0"}),
               httpx.Response(200, json=RESULT)]
    with client_with(lambda req: answers.pop(0)) as c:
        assert c.executions.create({"a.py": "x"}, runtime="python").ok
    assert answers == []


def test_retry_after_beyond_the_limit_raises_at_once():
    calls = []

    def handler(req):
        calls.append(1)
        return error(429, "queue_full", "busy", headers={"retry-after": "120"})

    with client_with(handler) as c, pytest.raises(RateLimitError) as e:
        c.executions.create({"a.py": "x"}, runtime="python")
    assert e.value.retry_after == 120 and len(calls) == 1


def test_a_runtime_unavailable_until_the_operator_acts_is_not_retried():
    calls = []

    def handler(req):
        calls.append(1)
        return error(503, "runtime_unavailable", "runtime py-oci is unavailable on this server: registry unreachable",
                     field="runtime")

    with client_with(handler) as c, pytest.raises(ServiceUnavailableError) as e:
        c.executions.create({"a.py": "x"}, runtime="py-oci")
    assert e.value.code == "runtime_unavailable" and e.value.retry_after is None and len(calls) == 1


def test_retries_stop_after_max_retries():
    calls = []

    def handler(req):
        calls.append(1)
        return error(503, "draining", "draining", headers={"retry-after": "0"})

    with client_with(handler, max_retries=1) as c, pytest.raises(ServiceUnavailableError):
        c.executions.create({"a.py": "x"}, runtime="python")
    assert len(calls) == 2


def test_connection_refused_is_retried_but_a_read_timeout_is_not():
    calls = []

    def refused_once(req):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("Connection refused", request=req)
        return httpx.Response(200, json=RESULT)

    with client_with(refused_once) as c:
        assert c.executions.create({"a.py": "x"}, runtime="python").ok
    assert len(calls) == 2

    calls.clear()

    def slow(req):
        calls.append(1)
        raise httpx.ReadTimeout("timed out", request=req)

    with client_with(slow) as c, pytest.raises(APITimeoutError):
        c.executions.create({"a.py": "x"}, runtime="python")
    assert len(calls) == 1, "the request may have started a program: not retried"


def test_refused_every_time_is_a_connection_error():
    def refused(req):
        raise httpx.ConnectError("Connection refused", request=req)

    with client_with(refused, max_retries=0) as c, pytest.raises(APIConnectionError) as e:
        c.executions.create({"a.py": "x"}, runtime="python")
    assert type(e.value) is APIConnectionError


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TVM_BASE_URL", "http://from-env:9/")
    monkeypatch.setenv("TVM_API_KEY", "env-key")
    c = Client()
    assert c.base_url == "http://from-env:9" and c.api_key == "env-key"
    c.close()
    c = Client("http://explicit", api_key="")
    assert c.base_url == "http://explicit" and c.api_key == ""
    assert "authorization" not in c._http.headers
    c.close()


def test_a_request_needs_a_runtime_or_a_language():
    with client_with(lambda req: httpx.Response(200, json=RESULT)) as c, pytest.raises(ValueError):
        c.executions.create({"a.py": "x"})


def test_files_from_mappings_pairs_and_paths(tmp_path: Path):
    (tmp_path / "util.py").write_bytes(b"X = 1\n")
    body = to_body([("main.py", "import util"), tmp_path / "util.py", str(tmp_path / "util.py")])
    assert body[0] == {"name": "main.py", "content": "import util"}
    assert body[1]["name"] == "util.py" and base64.b64decode(body[1]["content"]) == b"X = 1\n"
    assert body[2] == body[1]
    with pytest.raises(ValueError):
        to_body({})
    with pytest.raises(TypeError):
        to_body("main.py")
    with pytest.raises(TypeError):
        to_body({"a.py": 3})


# ---------------------------------------------------------------- SSE


def sse_bytes(events: List[tuple]) -> bytes:
    out = b": keep-alive\n\n"
    for name, data in events:
        out += f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        out += b":\n\n"
    return out


STREAM = [("stdout", {"stage": "run", "data": "h\u00e9"}), ("stderr", {"stage": "run", "data": "warn\n"}),
          ("result", RESULT)]


def test_sse_decoder_survives_any_split_and_crlf():
    raw = sse_bytes(STREAM)
    for variant in (raw, raw.replace(b"\n", b"\r\n"), raw.replace(b"\n", b"\r")):
        whole = [(e.event, e.data) for e in SSEDecoder().feed(variant)]
        assert [n for n, _ in whole] == ["stdout", "stderr", "result"]
        for cut in range(1, len(variant)):
            d = SSEDecoder()
            parts = d.feed(variant[:cut]) + d.feed(variant[cut:])
            assert [(e.event, e.data) for e in parts] == whole, (cut, variant[:cut])
        d = SSEDecoder()
        bytewise = [e for i in range(len(variant)) for e in d.feed(variant[i : i + 1])]
        assert [(e.event, e.data) for e in bytewise] == whole


def test_multiline_data_and_default_event_name():
    evs = SSEDecoder().feed(b"data: a\ndata: b\n\nevent: x\ndata:c\n\n")
    assert [(e.event, e.data) for e in evs] == [("message", "a\nb"), ("x", "c")]


class Chunks(httpx.SyncByteStream):
    def __init__(self, chunks, then=None):
        self.chunks, self.then = chunks, then

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.then is not None:
            raise self.then


def test_stream_yields_typed_events_and_callbacks():
    raw = sse_bytes(STREAM)
    chunks = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    got = {"out": [], "err": []}

    def handler(req):
        assert req.url.path == "/v1/executions/stream"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Chunks(chunks))

    with client_with(handler) as c:
        with c.executions.stream({"a.py": "x"}, runtime="python", on_stdout=got["out"].append,
                                 on_stderr=got["err"].append) as s:
            events = list(s)
        assert isinstance(events[0], OutputEvent) and events[0].data == "h\u00e9" and events[0].stream == "stdout"
        assert isinstance(events[-1], ResultEvent) and s.result.ok
        assert got == {"out": ["h\u00e9"], "err": ["warn\n"]}
        assert c.executions.stream({"a.py": "x"}, runtime="python").until_done().ok


def test_a_silent_stream_raises_stream_idle_timeout():
    def handler(req):
        return httpx.Response(200, stream=Chunks([b": keep-alive\n\n"], then=httpx.ReadTimeout("idle")))

    with client_with(handler) as c, pytest.raises(StreamIdleTimeoutError):
        c.executions.stream({"a.py": "x"}, runtime="python").until_done()


def test_a_stream_that_ends_without_a_result_is_an_error():
    def handler(req):
        return httpx.Response(200, stream=Chunks([sse_bytes(STREAM[:1])]))

    with client_with(handler) as c, pytest.raises(APIConnectionError, match="before the execution's result"):
        c.executions.stream({"a.py": "x"}, runtime="python").until_done()


def test_stream_refusals_before_start_are_errors_and_retried():
    answers = [error(429, "queue_full", "busy", headers={"retry-after": "0"}),
               error(422, "bad_file_name", "bad name", field="files")]
    with client_with(lambda req: answers.pop(0)) as c, pytest.raises(UnprocessableEntityError) as e:
        c.executions.stream({"a.py": "x"}, runtime="python").until_done()
    assert e.value.field == "files" and answers == []


# ---------------------------------------------------------------- async


def test_async_client_create_stream_and_lifecycle():
    raw = sse_bytes(STREAM)

    async def handler(req):
        if req.url.path == "/v1/executions/stream":
            return httpx.Response(200, content=raw)
        return httpx.Response(200, json=RESULT)

    async def main():
        async with AsyncClient("http://tvm.test", transport=httpx.MockTransport(handler)) as c:
            rs = await asyncio.gather(*(c.executions.create({"a.py": "x"}, language="python") for _ in range(3)))
            assert all(r.ok for r in rs)
            seen = []
            async with c.executions.stream({"a.py": "x"}, language="python", on_stdout=seen.append) as s:
                names = [type(e).__name__ async for e in s]
            assert names == ["OutputEvent", "OutputEvent", "ResultEvent"] and seen == ["h\u00e9"]
            assert (await c.executions.stream({"a.py": "x"}, language="python").until_done()).ok
            with pytest.raises(TypeError):
                await c.executions.create({"a.py": "x"}, langauge="python")

    # Two event loops one after the other: nothing outlives its loop ("event loop is closed").
    asyncio.run(main())
    asyncio.run(main())


def test_async_retries_and_errors():
    answers = [error(503, "draining", "d", headers={"retry-after": "0"}), error(422, "unknown_runtime", "no", field="runtime")]

    async def handler(req):
        return answers.pop(0)

    async def main():
        async with AsyncClient("http://tvm.test", transport=httpx.MockTransport(handler)) as c:
            with pytest.raises(UnprocessableEntityError):
                await c.executions.create({"a.py": "x"}, runtime="nope")

    asyncio.run(main())
    assert answers == []


TESTS_RESULT = dict(
    RESULT,
    run=None,
    tests=[
        {"index": 0, "verdict": "accepted", "comparison": "trailing_whitespace", "run": RESULT["run"]},
        {"index": 1, "verdict": "wrong_answer", "comparison": "trailing_whitespace",
         "run": dict(RESULT["run"], stdout="4\n")},
    ],
    summary={"total": 2, "ran": 2, "accepted": 1, "failed": 1, "max_wall_time_ms": 12, "max_cpu_time_ms": 10,
             "max_peak_memory_bytes": 1 << 20},
)


def test_tests_are_sent_as_documented_and_results_are_typed():
    seen = {}

    def handler(req):
        seen["body"] = json.loads(req.content)
        return httpx.Response(200, json=TESTS_RESULT)

    with client_with(handler) as c:
        r = c.executions.create(
            {"main.py": "print(sum(map(int, input().split())))"}, language="python",
            tests=[pyroshell.TestCase(stdin="2 3", expected_output="5"),
                   {"stdin": b"\x00", "args": ["x", 1]},
                   pyroshell.TestCase()],
        )
    assert seen["body"]["tests"] == [
        {"stdin": "2 3", "expected_output": "5"},
        {"stdin": "AA==", "stdin_encoding": "base64", "args": ["x", "1"]},
        {},
    ]
    assert "stdin" not in seen["body"] and "args" not in seen["body"]
    assert r.ok and r.run is None and r.stdout == ""
    assert [t.verdict for t in r.tests] == ["accepted", "wrong_answer"] and r.tests[1].run.stdout == "4\n"
    assert isinstance(r.tests[0], pyroshell.TestResult) and isinstance(r.summary, pyroshell.TestSummary)
    assert r.summary.accepted == 1 and r.summary.failed == 1 and not r.all_accepted


def test_bad_tests_fail_early_or_surface_the_servers_error():
    with client_with(lambda req: httpx.Response(200, json=RESULT)) as c:
        with pytest.raises(ValueError):
            c.executions.create({"a.py": "x"}, language="python", tests=[])
        with pytest.raises(TypeError):
            c.executions.create({"a.py": "x"}, language="python", tests={"stdin": "1"})
        with pytest.raises(pydantic.ValidationError):
            c.executions.create({"a.py": "x"}, language="python", tests=[{"stdni": "1"}])
    answer = error(422, "bad_tests", "tests and a top-level stdin cannot go together", field="tests")
    with client_with(lambda req: answer) as c, pytest.raises(UnprocessableEntityError) as e:
        c.executions.create({"a.py": "x"}, language="python", stdin="1", tests=[{"stdin": "2"}])
    assert (e.value.code, e.value.field) == ("bad_tests", "tests")


def test_async_create_takes_tests():
    seen = {}

    def handler(req):
        seen["body"] = json.loads(req.content)
        return httpx.Response(200, json=TESTS_RESULT)

    async def main():
        async with AsyncClient("http://tvm.test", "k", transport=httpx.MockTransport(handler)) as c:
            r = await c.executions.create({"a.py": "x"}, language="python", tests=[{"stdin": "1"}])
            with pytest.raises(TypeError):
                c.executions.stream({"a.py": "x"}, language="python", tests=[{"stdin": "1"}])
            return r

    r = asyncio.run(main())
    assert seen["body"]["tests"] == [{"stdin": "1"}] and r.summary.total == 2
