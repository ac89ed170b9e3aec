"""Interactive sessions: ``client.sessions.start(...)`` over the WebSocket ``/v1/sessions``.

The protocol (``docs/compat.md``, crate docs of ``pyroshell::session``): the client sends
``start`` (the fields of an execution request), then ``stdin`` (binary messages here), ``eof``
and ``signal``; the server answers ``started`` (``id``, ``runtime``), then ``stage``,
``stdout``/``stderr``, ``exit`` and last ``result``, closing with 1000. Before an abnormal close
it sends ``error`` (``code``, ``message``, ``field``) and closes with 4000 + the HTTP status an
equivalent request would get (4422 invalid request, 4429 overloaded, 4408 idle, ...), which
this module raises as the same exceptions as ``executions.create`` (see :func:`session_close_error`).

WebSocket framing, fragmented messages, pings and the close handshake are the ``websockets``
library's; this module adds the protocol, timeouts and the error mapping.
"""

from __future__ import annotations

import asyncio
import json
import signal as _signal
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import httpx
from pydantic import ValidationError
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import connect as sconnect

from . import _client as _c
from ._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    PyroshellError,
    SessionClosedError,
    StreamIdleTimeoutError,
    session_close_error,
    status_error,
)
from ._files import Files
from ._models import ExecutionResult, OutputEvent, ResultEvent, SessionEvent, parse_session_event
from ._version import __version__

__all__ = ["Sessions", "AsyncSessions", "Session", "AsyncSession", "STDIN_CHUNK_BYTES", "MAX_MESSAGE_BYTES"]

#: Stdin is sent in binary messages of at most this many bytes (the server takes messages up to
#: 1 MiB and at most 4 MiB of stdin per session, 200 messages per second).
STDIN_CHUNK_BYTES = 256 * 1024

#: Largest message accepted from the server (the ``result`` carries the whole output, text and base64).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

OutputCallback = Callable[[str], Any]
SignalLike = Union[str, int, _signal.Signals]


def _ws_url(base_url: str) -> str:
    if base_url.startswith("https://"):
        return "wss://" + base_url[len("https://") :] + "/v1/sessions"
    if base_url.startswith("http://"):
        return "ws://" + base_url[len("http://") :] + "/v1/sessions"
    raise ValueError(f"base_url must start with http:// or https://, not {base_url!r}")


def _connect_kwargs(client: Any) -> Dict[str, Any]:
    headers = {"authorization": f"Bearer {client.api_key}"} if client.api_key else {}
    return dict(
        additional_headers=headers,
        user_agent_header=f"pyroshell-python/{__version__}",
        open_timeout=client.timeouts.connect,
        # Bounded: a peer that never answers the close handshake costs at most this long.
        close_timeout=min(client.timeouts.connect, 5.0),
        max_size=MAX_MESSAGE_BYTES,
        compression=None,
    )


def _handshake_error(exc: BaseException) -> PyroshellError:
    """The exception for a failed connect + upgrade."""
    if isinstance(exc, InvalidStatus):
        r = exc.response
        response = httpx.Response(r.status_code, headers=list(r.headers.raw_items()), content=bytes(r.body or b""))
        response.read()
        return status_error(response)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return APITimeoutError(f"timed out opening the session: {exc}")
    if isinstance(exc, OSError):
        # Refused or unreachable: nothing was sent, so retrying cannot run a program twice.
        return _c._NotSent(f"cannot connect to the TVM server: {exc}")
    return APIConnectionError(f"opening the session failed: {exc}")


def _stdin_chunks(data: Union[str, bytes, bytearray, memoryview]) -> Iterator[bytes]:
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        raise TypeError(f"stdin must be str or bytes, not {type(data).__name__}")
    for i in range(0, len(raw), STDIN_CHUNK_BYTES):
        yield raw[i : i + STDIN_CHUNK_BYTES]


def _signal_message(sig: SignalLike) -> str:
    if isinstance(sig, _signal.Signals):
        # By name: the host's numbering may differ from the guest's (Linux).
        value: Union[str, int] = sig.name
    elif isinstance(sig, bool) or not isinstance(sig, (str, int)):
        raise TypeError(f"signal must be a name like 'SIGINT' or a number, not {sig!r}")
    elif isinstance(sig, int):
        if not 1 <= sig <= 31:
            raise ValueError(f"signal number {sig} is not a standard Linux signal (1 to 31)")
        value = sig
    else:
        if not sig.strip():
            raise ValueError("signal name is empty")
        value = sig.strip()
    return json.dumps({"type": "signal", "signal": value})


class _Protocol:
    """What the sync and async sessions share: message decoding and state."""

    def __init__(
        self,
        client: Any,
        body: Dict[str, Any],
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
        idle_timeout: Optional[float],
    ) -> None:
        self._client = client
        self._start = json.dumps({"type": "start", **body})
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self.idle_timeout = idle_timeout if idle_timeout is not None else client.timeouts.session_idle
        self._notice: Optional[Dict[str, Any]] = None
        #: The execution id (from ``started``).
        self.id: str = ""
        #: The runtime the server chose (from ``started``).
        self.runtime: str = ""
        #: The result, once it arrived.
        self.result: Optional[ExecutionResult] = None

    def _decode(self, raw: Union[str, bytes]) -> Optional[Dict[str, Any]]:
        if isinstance(raw, bytes):
            raise APIResponseValidationError("the server sent a binary session message", body=raw[:200])
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise APIResponseValidationError(f"session message is not JSON: {e}", body=raw[:200]) from e
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise APIResponseValidationError("session message is not an object with a type", body=data)
        return data

    def _started(self, data: Dict[str, Any]) -> bool:
        """Handles the first message; ``True`` when it was ``started``."""
        if data["type"] == "error":
            self._notice = data
            return False
        if data["type"] != "started":
            raise APIResponseValidationError(f"expected a started message, got {data['type']!r}", body=data)
        self.id = str(data.get("id", ""))
        self.runtime = str(data.get("runtime", ""))
        return True

    def _event(self, data: Dict[str, Any]) -> Optional[SessionEvent]:
        if data["type"] == "error":
            self._notice = data
            return None
        try:
            event = parse_session_event(data)
        except ValidationError as e:
            raise APIResponseValidationError(f"bad {data['type']!r} session message: {e}", body=data) from e
        if isinstance(event, OutputEvent) and self._on.get(event.stream):
            self._on[event.stream](event.data)  # type: ignore[misc]
        if isinstance(event, ResultEvent):
            self.result = event.result
        return event

    def _closed(self, exc: ConnectionClosed) -> PyroshellError:
        rcvd = exc.rcvd
        err = session_close_error(rcvd.code if rcvd else None, rcvd.reason if rcvd else "", self._notice)
        err.__cause__ = exc
        return err

    def _idle(self) -> StreamIdleTimeoutError:
        return StreamIdleTimeoutError(f"the session sent nothing for {self.idle_timeout} s (idle timeout)")

    def _ended(self) -> SessionClosedError:
        return SessionClosedError("the session has ended", close_code=1000 if self.result else None)


# --------------------------------------------------------------------------- sync


class Session(_Protocol):
    """A running interactive execution (sync); returned by ``client.sessions.start(...)``.

    Send input with :meth:`send_stdin`, :meth:`close_stdin` and :meth:`signal`; iterate for
    typed events (:class:`StageEvent`, :class:`OutputEvent`, :class:`ExitEvent`, last a
    :class:`ResultEvent`), or call :meth:`wait` for the result. Leaving the ``with`` block (or
    :meth:`close`) closes the socket, which makes the server end the VM at once.

    Sending from one thread while another iterates is safe; iterate from one thread only.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._ws: Any = None
        self._cm: Any = None

    def _open(self) -> None:
        attempt = 0
        while True:
            try:
                self._open_once()
                return
            except PyroshellError as err:
                wait = self._client._retry.delay(attempt, err)
                if wait is None:
                    raise _c._public(err) if isinstance(err, APIConnectionError) else err
                time.sleep(wait)
                attempt += 1
                self._notice = None

    def _open_once(self) -> None:
        try:
            # Entered as a context manager: newer websockets deprecate using connect() directly;
            # close() exits it.
            cm = sconnect(_ws_url(self._client.base_url), **_connect_kwargs(self._client))
            ws = cm.__enter__()
        except (OSError, WebSocketException, TimeoutError) as exc:
            raise _handshake_error(exc) from exc
        self._ws, self._cm = ws, cm
        try:
            ws.send(self._start)
            while True:
                if self._started(self._decode(self._recv())):
                    return
        except BaseException:
            self.close()
            raise

    def _recv(self) -> Union[str, bytes]:
        try:
            return self._ws.recv(timeout=self.idle_timeout)
        except TimeoutError:
            self.close()
            raise self._idle() from None
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc

    def _send(self, message: Union[str, bytes]) -> None:
        if self._ws is None:
            raise self._ended()
        try:
            self._ws.send(message)
        except ConnectionClosed as exc:
            if self.result is not None:
                raise self._ended() from exc
            raise self._closed(exc) from exc

    def send_stdin(self, data: Union[str, bytes]) -> None:
        """Sends ``data`` to the program's stdin (text as UTF-8, bytes as they are), in binary
        messages of at most :data:`STDIN_CHUNK_BYTES`.

        Raises: :class:`PayloadTooLargeError` (the server's 4 MiB per session, close 4413),
        :class:`RateLimitError` (over 200 messages/s), :class:`SessionClosedError` (the session
        has ended or the connection dropped).
        """
        for chunk in _stdin_chunks(data):
            self._send(chunk)

    def close_stdin(self) -> None:
        """Closes the program's stdin (it reads EOF once it has read what was sent)."""
        self._send(json.dumps({"type": "eof"}))

    def signal(self, sig: SignalLike) -> None:
        """Sends a signal to the program: a name (``"SIGINT"``, ``"INT"``), a :class:`signal.Signals`
        (sent by name), or a Linux signal number 1-31. ``ValueError`` for numbers out of range;
        an unknown name ends the session with :class:`BadRequestError` (close 4400)."""
        self._send(_signal_message(sig))

    def __iter__(self) -> Iterator[SessionEvent]:
        while self.result is None:
            if self._ws is None:
                raise self._ended()
            event = self._event(self._decode(self._recv()))
            if event is not None:
                if isinstance(event, ResultEvent):
                    self.close()
                yield event

    def wait(self) -> ExecutionResult:
        """Consumes the remaining events (callbacks still fire) and returns the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def close(self) -> None:
        """Closes the socket (1000); before the result, the server ends the program's VM."""
        if self._ws is not None:
            cm, self._ws, self._cm = self._cm, None, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Sessions:
    """``client.sessions``: interactive executions over WebSocket."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def start(
        self,
        files: Files,
        *,
        runtime: Optional[str] = None,
        language: Optional[str] = None,
        version: Optional[str] = None,
        entry: Optional[str] = None,
        args: Optional[Sequence[str]] = None,
        limits: "_c.LimitsLike" = None,
        compile_limits: "_c.LimitsLike" = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        idle_timeout: Optional[float] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> Session:
        """Starts ``files`` in a fresh VM with stdin open for :meth:`Session.send_stdin`
        (``GET /v1/sessions``, WebSocket). Arguments as in ``executions.create`` (no ``stdin``:
        send it; no ``tests``). Returns once the server sent ``started``.

        ``idle_timeout`` (s, default ``timeouts.session_idle``): the longest wait for a server
        message while receiving; then :class:`StreamIdleTimeoutError` and the socket is closed.
        The server itself ends a session with neither input nor output for 60 s (close 4408).

        Raises: as ``executions.create`` for a refused start (:class:`UnprocessableEntityError`
        with ``field`` for close 4422, :class:`AuthenticationError`, :class:`RateLimitError` after
        retries, ...), :class:`APIConnectionError`/:class:`APITimeoutError`.
        """
        body = _c._execution_body(
            files, runtime=runtime, language=language, version=version, entry=entry, stdin=None,
            args=args, limits=limits, compile_limits=compile_limits, extra=extra_body,
        )
        session = Session(self._client, body, on_stdout, on_stderr, idle_timeout)
        session._open()
        return session


# -------------------------------------------------------------------------- async


class AsyncSession(_Protocol):
    """The asyncio twin of :class:`Session`: ``async with client.sessions.start(...) as s`` (or
    ``s = await client.sessions.start(...)``), ``await s.send_stdin(...)``, ``async for ev in s``,
    ``await s.wait()``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._ws: Any = None
        self._cm: Any = None

    async def _open(self) -> "AsyncSession":
        attempt = 0
        while True:
            try:
                await self._open_once()
                return self
            except PyroshellError as err:
                wait = self._client._retry.delay(attempt, err)
                if wait is None:
                    raise _c._public(err) if isinstance(err, APIConnectionError) else err
                await asyncio.sleep(wait)
                attempt += 1
                self._notice = None

    async def _open_once(self) -> None:
        try:
            cm = aconnect(_ws_url(self._client.base_url), **_connect_kwargs(self._client))
            ws = await cm.__aenter__()
        except (OSError, WebSocketException, TimeoutError, asyncio.TimeoutError) as exc:
            raise _handshake_error(exc) from exc
        self._ws, self._cm = ws, cm
        try:
            await ws.send(self._start)
            while True:
                if self._started(self._decode(await self._recv())):
                    return
        except BaseException:
            await self.close()
            raise

    async def _recv(self) -> Union[str, bytes]:
        try:
            return await asyncio.wait_for(self._ws.recv(), self.idle_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            await self.close()
            raise self._idle() from None
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc

    async def _send(self, message: Union[str, bytes]) -> None:
        if self._ws is None:
            raise self._ended()
        try:
            await self._ws.send(message)
        except ConnectionClosed as exc:
            if self.result is not None:
                raise self._ended() from exc
            raise self._closed(exc) from exc

    async def send_stdin(self, data: Union[str, bytes]) -> None:
        """See :meth:`Session.send_stdin`."""
        for chunk in _stdin_chunks(data):
            await self._send(chunk)

    async def close_stdin(self) -> None:
        """See :meth:`Session.close_stdin`."""
        await self._send(json.dumps({"type": "eof"}))

    async def signal(self, sig: SignalLike) -> None:
        """See :meth:`Session.signal`."""
        await self._send(_signal_message(sig))

    async def __aiter__(self) -> AsyncIterator[SessionEvent]:
        while self.result is None:
            if self._ws is None:
                raise self._ended()
            event = self._event(self._decode(await self._recv()))
            if event is not None:
                if isinstance(event, ResultEvent):
                    await self.close()
                yield event

    async def wait(self) -> ExecutionResult:
        """See :meth:`Session.wait`."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def close(self) -> None:
        """See :meth:`Session.close`."""
        if self._ws is not None:
            cm, self._ws, self._cm = self._cm, None, None
            await cm.__aexit__(None, None, None)

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> "AsyncSession":
        if self._ws is None and not self.id:
            await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncSessions:
    """``client.sessions`` of :class:`AsyncClient`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def start(
        self,
        files: Files,
        *,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        idle_timeout: Optional[float] = None,
        **kwargs: Any,
    ) -> AsyncSession:
        """See :meth:`Sessions.start`; the session connects when awaited or entered (``async with``)."""
        kw = _c._kw(kwargs)
        if kw.get("stdin") is not None:
            raise TypeError("a session takes no stdin argument: send it with send_stdin()")
        body = _c._execution_body(files, **kw)
        return AsyncSession(self._client, body, on_stdout, on_stderr, idle_timeout)

