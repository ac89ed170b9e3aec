"""Session client against an in-process fake WebSocket server (websockets' own server): the
protocol's edge cases without a VM. The real server is exercised by test_integration.py."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from pyroshell import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ExitEvent,
    InternalServerError,
    OutputEvent,
    PayloadTooLargeError,
    RequestTimeoutError,
    ResultEvent,
    SessionClosedError,
    StageEvent,
    StreamIdleTimeoutError,
    Timeouts,
    UnprocessableEntityError,
)
from pyroshell._session import STDIN_CHUNK_BYTES

RESULT = {
    "id": "s1",
    "verdict": "ok",
    "runtime": "python-3.13",
    "run": {"status": "ok", "exit_code": 0, "stdout": "echo: hi\n", "stderr": "", "wall_time_ms": 5},
}


class Fake:
    """One fake server: ``handler(conn, start)`` runs per connection after the start message;
    everything received is recorded in ``received`` (start included), close codes in ``closes``."""

    def __init__(self, handler: Callable[["Fake", ServerConnection, dict], None], *, reject: int = 0) -> None:
        self.handler = handler
        self.received: List = []
        self.headers: List = []
        self.closes: "queue.Queue" = queue.Queue()
        self.connections = 0
        self.reject = reject

    def recv(self, conn: ServerConnection):
        msg = conn.recv(timeout=10)
        self.received.append(msg)
        return msg

    def serve_one(self, conn: ServerConnection) -> None:
        self.connections += 1
        self.headers.append(dict(conn.request.headers))
        try:
            start = json.loads(self.recv(conn))
            self.handler(self, conn, start)
        except ConnectionClosed as e:
            self.closes.put(e.rcvd.code if e.rcvd else None)
            return
        # The handler returned: wait for the client's close.
        try:
            while True:
                self.recv(conn)
        except ConnectionClosed as e:
            self.closes.put(e.rcvd.code if e.rcvd else None)
        except TimeoutError:
            self.closes.put("no close")


@contextmanager
def fake_server(handler, **kw) -> Iterator[tuple]:
    fake = Fake(handler, **kw)

    def process_request(conn, request):
        if fake.reject:
            fake.reject -= 1
            return conn.respond(401, '{"error":{"code":"unauthorized","message":"missing or wrong API key"}}\n')
        return None

    with serve(fake.serve_one, "127.0.0.1", 0, process_request=process_request, compression=None) as server:
        port = server.socket.getsockname()[1]
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        try:
            yield f"http://127.0.0.1:{port}", fake
        finally:
            server.shutdown()
            t.join(10)


def send(conn, **msg) -> None:
    conn.send(json.dumps(msg))


def echo_handler(fake, conn, start):
    send(conn, type="started", id="s1", runtime="python-3.13")
    send(conn, type="stage", stage="run")
    line = fake.recv(conn)
    send(conn, type="stdout", stage="run", data="echo: " + line.decode())
    eof = json.loads(fake.recv(conn))
    assert eof == {"type": "eof"}
    send(conn, type="exit", stage="run", status="ok", exit_code=0, signal=None)
    send(conn, type="result", **RESULT)
    conn.close(1000, "ok")


def client(url, **kw) -> Client:
    kw.setdefault("timeouts", Timeouts(connect=5, session_idle=10))
    return Client(url, "key", **kw)


def test_start_stdin_eof_events_and_result():
    with fake_server(echo_handler) as (url, fake), client(url) as c:
        out: List[str] = []
        with c.sessions.start({"main.py": "print(input())"}, language="python",
                              limits={"wall_time_ms": 9000}, on_stdout=out.append) as s:
            assert (s.id, s.runtime) == ("s1", "python-3.13")
            s.send_stdin("hi\n")
            s.close_stdin()
            events = list(s)
            assert s.wait() is s.result
        assert [type(e) for e in events] == [StageEvent, OutputEvent, ExitEvent, ResultEvent]
        assert events[1].stream == "stdout" and events[1].data == "echo: hi\n" and out == ["echo: hi\n"]
        assert events[2].exit_code == 0 and events[2].status == "ok"
        assert s.result.ok and s.result.stdout == "echo: hi\n"
        start = json.loads(fake.received[0])
        assert start == {"type": "start", "files": [{"name": "main.py", "content": "print(input())"}],
                         "language": "python", "run_limits": {"wall_time_ms": 9000}}
        assert fake.received[1] == b"hi\n"  # stdin travels as a binary message
        assert fake.headers[0]["authorization"] == "Bearer key"
        assert fake.headers[0]["user-agent"].startswith("pyroshell-python/")
        # The client answered the server's close.
        assert fake.closes.get(timeout=5) == 1000
        with pytest.raises(SessionClosedError):
            s.send_stdin("late\n")


def test_large_stdin_is_chunked_and_signals_are_sent_by_name_or_number():
    size = STDIN_CHUNK_BYTES * 2 + 10

    def handler(fake, conn, start):
        send(conn, type="started", id="s2", runtime="c")
        got = b""
        while len(got) < size:
            got += fake.recv(conn)
        sigs = [json.loads(fake.recv(conn))["signal"] for _ in range(3)]
        send(conn, type="stdout", stage="run", data=f"{len(got)} {sigs}")
        send(conn, type="result", **RESULT)
        conn.close(1000, "ok")

    with fake_server(handler) as (url, fake), client(url) as c:
        with c.sessions.start({"main.c": "int main(){}"}, runtime="c") as s:
            s.send_stdin(b"\xff" * size)
            s.signal("SIGINT")
            s.signal(15)
            s.signal(signal.SIGUSR1)
            with pytest.raises(ValueError):
                s.signal(99)
            with pytest.raises(TypeError):
                s.signal(2.0)  # type: ignore[arg-type]
            events = list(s)
        assert events[0].data == f"{size} ['SIGINT', 15, 'SIGUSR1']"
        assert [len(m) for m in fake.received[1:4]] == [STDIN_CHUNK_BYTES, STDIN_CHUNK_BYTES, 10]


def test_fragmented_messages_and_unknown_types_are_handled():
    def handler(fake, conn, start):
        send(conn, type="started", id="s3", runtime="python-3.13")
        # One message in three frames, a UTF-8 character split between two.
        text = json.dumps({"type": "stdout", "stage": "run", "data": "h\u00e9llo"}, ensure_ascii=False).encode()
        cut = text.index("\u00e9".encode()) + 1
        conn.send([text[:5], text[5:cut], text[cut:]], text=True)
        send(conn, type="future_kind", x=1)  # newer servers may add kinds
        send(conn, type="result", **RESULT)
        conn.close(1000, "ok")

    with fake_server(handler) as (url, _), client(url) as c:
        with c.sessions.start({"main.py": ""}, language="python") as s:
            events = list(s)
    assert isinstance(events[0], OutputEvent) and events[0].data == "h\u00e9llo"
    assert isinstance(events[1], ResultEvent) and len(events) == 2


def refuse(code, error, field=None):
    def handler(fake, conn, start):
        notice = {"type": "error", "code": error, "message": f"{error} happened"}
        if field:
            notice["field"] = field
        conn.send(json.dumps(notice))
        conn.close(code, error)

    return handler


@pytest.mark.parametrize("code,cls", [(4422, UnprocessableEntityError), (4400, BadRequestError),
                                      (4408, RequestTimeoutError), (4413, PayloadTooLargeError),
                                      (4500, InternalServerError)])
def test_refused_start_raises_the_http_twin(code, cls):
    with fake_server(refuse(code, "invalid_request", "runtime")) as (url, _), client(url) as c:
        with pytest.raises(cls) as e:
            c.sessions.start({"main.py": ""}, runtime="cobol-85")
    err = e.value
    assert (err.status_code, err.close_code, err.code, err.field) == (code - 4000, code, "invalid_request", "runtime")
    assert err.message == "invalid_request happened"


def test_overloaded_start_is_retried_then_runs():
    calls = []

    def handler(fake, conn, start):
        calls.append(1)
        if len(calls) == 1:
            return refuse(4429, "overloaded")(fake, conn, start)
        echo_handler(fake, conn, start)

    with fake_server(handler) as (url, fake), client(url, max_retries=2) as c:
        with c.sessions.start({"main.py": ""}, language="python") as s:
            s.send_stdin("hi\n")
            s.close_stdin()
            assert s.wait().ok
    assert fake.connections == 2


def test_unexpected_close_mid_session_and_dropped_connection():
    def closes_1011(fake, conn, start):
        send(conn, type="started", id="x", runtime="r")
        send(conn, type="stdout", stage="run", data="partial")
        conn.close(1011, "boom")

    def drops(fake, conn, start):
        send(conn, type="started", id="x", runtime="r")
        conn.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the TCP connection just ends

    with fake_server(closes_1011) as (url, _), client(url) as c:
        s = c.sessions.start({"main.py": ""}, language="python")
        got = []
        with pytest.raises(SessionClosedError) as e:
            for ev in s:
                got.append(ev)
        assert e.value.close_code == 1011 and e.value.reason == "boom" and got[0].data == "partial"
        s.close()
    with fake_server(drops) as (url, _), client(url) as c:
        with c.sessions.start({"main.py": ""}, language="python") as s, pytest.raises(SessionClosedError) as e:
            s.wait()
        assert e.value.close_code is None


def test_idle_session_raises_and_closes_the_socket():
    def silent(fake, conn, start):
        send(conn, type="started", id="x", runtime="r")

    with fake_server(silent) as (url, fake), client(url) as c:
        with c.sessions.start({"main.py": ""}, language="python", idle_timeout=0.5) as s:
            with pytest.raises(StreamIdleTimeoutError):
                s.wait()
        assert fake.closes.get(timeout=5) == 1000  # the client closed it cleanly
    # No started within the idle timeout either.
    with fake_server(lambda fake, conn, start: None) as (url, fake), client(url) as c:
        with pytest.raises(StreamIdleTimeoutError):
            c.sessions.start({"main.py": ""}, language="python", idle_timeout=0.5)


def test_leaving_the_block_early_closes_with_1000():
    def chatty(fake, conn, start):
        send(conn, type="started", id="x", runtime="r")
        send(conn, type="stdout", stage="run", data="1")

    with fake_server(chatty) as (url, fake), client(url) as c:
        with c.sessions.start({"main.py": ""}, language="python") as s:
            assert isinstance(next(iter(s)), OutputEvent)
        assert fake.closes.get(timeout=5) == 1000


def test_handshake_refusal_and_connection_refused():
    with fake_server(echo_handler, reject=1) as (url, _), client(url) as c:
        with pytest.raises(AuthenticationError) as e:
            c.sessions.start({"main.py": ""}, language="python")
        assert e.value.code == "unauthorized" and e.value.close_code is None
    from pyroshell import APIConnectionError

    with client("http://127.0.0.1:9", max_retries=0) as c, pytest.raises(APIConnectionError):
        c.sessions.start({"main.py": ""}, language="python")


def test_async_session_and_idle_timeout():
    def silent(fake, conn, start):
        send(conn, type="started", id="x", runtime="r")

    async def main(url_echo, url_silent):
        t = Timeouts(connect=5, session_idle=10)
        async with AsyncClient(url_echo, "key", timeouts=t) as c:
            out: List[str] = []
            async with c.sessions.start({"main.py": ""}, language="python", on_stdout=out.append) as s:
                assert s.id == "s1"
                await s.send_stdin(b"hi\n")
                await s.close_stdin()
                result = await s.wait()
            assert result.ok and out == ["echo: hi\n"]
            with pytest.raises(TypeError):
                c.sessions.start({"main.py": ""}, language="python", stdin="x")
        async with AsyncClient(url_silent, "key", timeouts=t) as c:
            s = await c.sessions.start({"main.py": ""}, language="python", idle_timeout=0.3)
            with pytest.raises(StreamIdleTimeoutError):
                async for _ in s:
                    pass
            await s.close()

    with fake_server(echo_handler) as (u1, f1), fake_server(silent) as (u2, f2):
        asyncio.run(main(u1, u2))
        assert f1.closes.get(timeout=5) == 1000 and f2.closes.get(timeout=5) == 1000
