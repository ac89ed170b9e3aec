"""``Client`` and ``AsyncClient``: the TVM API v1 over httpx."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import httpx
from pydantic import ValidationError

from ._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    RateLimitError,
    ServiceUnavailableError,
    StreamIdleTimeoutError,
    status_error,
)
from ._files import Files, stdin_body, to_body
from ._models import (
    ExecutionResult,
    OutputEvent,
    ResultEvent,
    Runtime,
    RuntimeList,
    StreamEvent,
    Limits,
    TestCase,
    parse_stream_event,
)
from ._session import AsyncSessions, Sessions
from ._sse import SSEDecoder
from ._version import __version__

__all__ = ["Client", "AsyncClient", "Timeouts", "DEFAULT_BASE_URL"]

#: Where ``tvm serve`` listens by default.
DEFAULT_BASE_URL = "http://127.0.0.1:8080"

LimitsLike = Union[Limits, Mapping[str, int], None]
#: Tests of a compile-once-run-many request: :class:`TestCase` objects or dicts with its field names.
TestsLike = Optional[Sequence[Union[TestCase, Mapping[str, Any]]]]
OutputCallback = Callable[[str], Any]


@dataclass(frozen=True)
class Timeouts:
    """Timeouts in seconds, each for one kind of waiting.

    - ``connect``: establishing the TCP connection.
    - ``request``: waiting for the server's answer to a request. An execution's
      answer comes when it has finished (queue + boot + compile + run), so this must
      exceed the longest wall time you allow plus the server's queue timeout.
    - ``stream_idle``: on a stream, the longest gap between two things the server
      sends (output, result or its keep-alive comment, every 15 s); a dead stream
      raises :class:`StreamIdleTimeoutError` instead of hanging.
    - ``session_idle``: in an interactive session, the longest wait for the server's next
      message while receiving (:class:`StreamIdleTimeoutError` after it). Longer than the
      server's own 60 s idle close, so its reason (close 4408) arrives first; WebSocket pings
      (every 20 s) find a dead connection sooner.
    """

    connect: float = 5.0
    request: float = 300.0
    stream_idle: float = 60.0
    session_idle: float = 75.0

    def for_request(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.request, write=self.request, pool=self.connect)

    def for_stream(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.stream_idle, write=self.request, pool=self.connect)


def _limits(value: LimitsLike) -> Optional[Dict[str, int]]:
    if value is None:
        return None
    if isinstance(value, Limits):
        body = value.to_body()
    else:
        body = Limits(**dict(value)).to_body()
    return body or None


def _execution_body(
    files: Files,
    *,
    runtime: Optional[str],
    language: Optional[str],
    version: Optional[str],
    entry: Optional[str],
    stdin: Union[str, bytes, None],
    args: Optional[Sequence[str]],
    limits: LimitsLike,
    compile_limits: LimitsLike,
    extra: Optional[Mapping[str, Any]],
    tests: TestsLike = None,
) -> Dict[str, Any]:
    if runtime is None and language is None:
        raise ValueError("name a runtime (e.g. runtime='python-3.13') or a language (e.g. language='python')")
    body: Dict[str, Any] = {"files": to_body(files)}
    for key, value in (("runtime", runtime), ("language", language), ("version", version), ("entry", entry)):
        if value is not None:
            body[key] = value
    body.update(stdin_body(stdin))
    if args:
        body["args"] = [str(a) for a in args]
    run = _limits(limits)
    if run:
        body["run_limits"] = run
    comp = _limits(compile_limits)
    if comp:
        body["compile_limits"] = comp
    if tests is not None:
        if isinstance(tests, (str, bytes, Mapping)):
            raise TypeError("tests must be a list of TestCase objects or dicts")
        if not tests:
            raise ValueError("tests needs at least one test (or leave it out for a single run)")
        body["tests"] = [(t if isinstance(t, TestCase) else TestCase(**dict(t))).to_body() for t in tests]
    if extra:
        body.update(extra)
    return body


class _Retry:
    """When and how long to wait before trying again. Only where a retry cannot run a program twice:
    the connection was refused (nothing was sent), or the server said 429/503 (it refused before starting)."""

    def __init__(self, max_retries: int, max_wait: float) -> None:
        self.max_retries = max_retries
        self.max_wait = max_wait

    def delay(self, attempt: int, err: Exception) -> Optional[float]:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to give up and raise ``err``."""
        if attempt >= self.max_retries:
            return None
        backoff = min(8.0, 0.5 * (2**attempt)) * (0.75 + random.random() / 2)
        if isinstance(err, ServiceUnavailableError) and err.code == "runtime_unavailable":
            return None  # waiting does not bring back a failed image or an unreachable registry
        if isinstance(err, (RateLimitError, ServiceUnavailableError)):
            wait = err.retry_after if err.retry_after is not None else backoff
            return wait if wait <= self.max_wait else None
        if isinstance(err, _NotSent):
            return backoff
        return None


class _NotSent(APIConnectionError):
    """The connection could not be established: the request never reached the server."""


def _transport_error(exc: httpx.HTTPError, request: Optional[httpx.Request], *, streaming: bool) -> APIConnectionError:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return _NotSent(f"cannot connect to the TVM server: {exc}", request=request)
    if isinstance(exc, httpx.ReadTimeout) and streaming:
        return StreamIdleTimeoutError("the stream sent nothing within the idle timeout", request=request)
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out waiting for the TVM server: {exc}", request=request)
    return APIConnectionError(f"connection to the TVM server failed: {exc}", request=request)


def _request_of(exc: httpx.HTTPError) -> Optional[httpx.Request]:
    try:
        return exc.request
    except RuntimeError:  # httpx raises when the error carries no request
        return None


def _public(err: APIConnectionError) -> APIConnectionError:
    """The error users see: ``_NotSent`` is an internal marker."""
    if type(err) is _NotSent:
        out = APIConnectionError(str(err), request=err.request)
        out.__cause__ = err.__cause__
        return out
    return err


def _parse(model: Any, response: httpx.Response) -> Any:
    try:
        data = response.json()
    except ValueError as e:
        raise APIResponseValidationError(f"response is not JSON: {e}", response=response) from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIResponseValidationError(f"response is not a {model.__name__}: {e}", response=response, body=data) from e


def _settings(
    base_url: Optional[str], api_key: Optional[str]
) -> "tuple[str, Optional[str]]":
    url = base_url or os.environ.get("TVM_BASE_URL") or DEFAULT_BASE_URL
    key = api_key if api_key is not None else os.environ.get("TVM_API_KEY") or None
    return url.rstrip("/"), key


def _headers(api_key: Optional[str]) -> Dict[str, str]:
    h = {"user-agent": f"pyroshell-python/{__version__}", "accept": "application/json"}
    if api_key:
        h["authorization"] = f"Bearer {api_key}"
    return h


def _entry_name(runtime: Runtime) -> str:
    return runtime.entry or f"main{runtime.extensions[0] if runtime.extensions else ''}"


def _find_runtime(runtimes: List[Runtime], name: str) -> Optional[Runtime]:
    name_l = name.lower()
    for r in runtimes:
        if r.id == name or name in r.aliases:
            return r
    # A language name: the server's preferred available version.
    for r in runtimes:
        if r.language.lower() == name_l and r.available:
            return r
    return None


# --------------------------------------------------------------------------- sync


class ExecutionStream:
    """A running execution's events (sync). Iterate for :class:`OutputEvent`\\ s and the final
    :class:`ResultEvent`; :attr:`result` holds the result afterwards. Closing it (``with`` or
    :meth:`close`) disconnects, which makes the server destroy the VM."""

    def __init__(
        self,
        client: "Client",
        body: Dict[str, Any],
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
    ) -> None:
        self._client = client
        self._body = body
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self._cm: Any = None
        self._response: Optional[httpx.Response] = None
        self.result: Optional[ExecutionResult] = None

    def _open(self) -> httpx.Response:
        attempt = 0
        while True:
            cm = self._client._http.stream(
                "POST",
                "/v1/executions/stream",
                json=self._body,
                timeout=self._client.timeouts.for_stream(),
                headers={"accept": "text/event-stream"},
            )
            try:
                response = cm.__enter__()
            except httpx.HTTPError as exc:
                err: Exception = _transport_error(exc, None, streaming=True)
            else:
                if response.status_code == 200:
                    self._cm = cm
                    return response
                response.read()
                err = status_error(response)
                cm.__exit__(None, None, None)
            wait = self._client._retry.delay(attempt, err)
            if wait is None:
                if isinstance(err, APIConnectionError):
                    raise _public(err)
                raise err
            time.sleep(wait)
            attempt += 1

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._response is None:
            self._response = self._open()
        decoder = SSEDecoder()
        try:
            for chunk in self._response.iter_bytes():
                for sse in decoder.feed(chunk):
                    event = self._event(sse.event, sse.data)
                    if event is not None:
                        yield event
                        if isinstance(event, ResultEvent):
                            return
        except httpx.HTTPError as exc:
            raise _public(_transport_error(exc, None, streaming=True)) from exc
        finally:
            self.close()
        if self.result is None:
            raise APIConnectionError("the stream ended before the execution's result")

    def _event(self, name: str, data: str) -> Optional[StreamEvent]:
        try:
            event = parse_stream_event(name, json.loads(data) if data else None)
        except (ValueError, ValidationError) as e:
            assert self._response is not None
            raise APIResponseValidationError(f"bad {name!r} event: {e}", response=self._response, body=data) from e
        if isinstance(event, OutputEvent) and self._on.get(event.stream):
            self._on[event.stream](event.data)  # type: ignore[misc]
        if isinstance(event, ResultEvent):
            self.result = event.result
        return event

    def until_done(self) -> ExecutionResult:
        """Consumes the stream (callbacks still fire) and returns the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> "ExecutionStream":
        self._response = self._open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Executions:
    """``client.executions``: run programs."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def create(
        self,
        files: Files,
        *,
        runtime: Optional[str] = None,
        language: Optional[str] = None,
        version: Optional[str] = None,
        entry: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        args: Optional[Sequence[str]] = None,
        limits: LimitsLike = None,
        compile_limits: LimitsLike = None,
        tests: TestsLike = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> ExecutionResult:
        """Runs ``files`` in a fresh VM and returns when it has finished (``POST /v1/executions``).

        ``files``: ``{"main.py": "print(1)"}``, ``[("main.c", b"...")]`` or a list of paths; the first
        file is the entry unless ``entry`` says otherwise. Name the runtime by ``runtime`` (id or alias,
        e.g. ``python-3.11``) or by ``language`` (+ ``version``). ``limits`` and ``compile_limits``:
        :class:`Limits` or a dict with its field names (ms, bytes, counts).

        ``tests`` (compile once, run many): 1 to 64 :class:`TestCase`\\ s (or dicts with its fields,
        at most 16 MiB of stdin in all). The program is built once and run once per test, each in a
        fresh work dir; leave ``stdin`` and ``args`` out then. The result has ``tests`` (one
        :class:`TestResult` each: ``accepted``, ``wrong_answer``, ``runtime_error`` or a limit
        verdict) and ``summary``, and no ``run``.

        Returns the result; the program's failure is its ``verdict``, not an exception.

        Raises: :class:`UnprocessableEntityError` (invalid request, e.g. unknown runtime, with
        ``field``; ``tests`` together with ``stdin``/``args``, or more than 64: code ``bad_tests``),
        :class:`RateLimitError` (server full, after retries), :class:`AuthenticationError`,
        :class:`APIConnectionError`/:class:`APITimeoutError`, other :class:`APIStatusError`.
        """
        body = _execution_body(
            files,
            runtime=runtime,
            language=language,
            version=version,
            entry=entry,
            stdin=stdin,
            args=args,
            limits=limits,
            compile_limits=compile_limits,
            extra=extra_body,
            tests=tests,
        )
        return _parse(ExecutionResult, self._client._request("POST", "/v1/executions", json=body))

    def stream(
        self,
        files: Files,
        *,
        runtime: Optional[str] = None,
        language: Optional[str] = None,
        version: Optional[str] = None,
        entry: Optional[str] = None,
        stdin: Union[str, bytes, None] = None,
        args: Optional[Sequence[str]] = None,
        limits: LimitsLike = None,
        compile_limits: LimitsLike = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> ExecutionStream:
        """Like :meth:`create`, but output arrives as it happens (``POST /v1/executions/stream``).

        Iterate the returned :class:`ExecutionStream` for typed events, or call its ``until_done()``
        with ``on_stdout``/``on_stderr`` callbacks. A stream silent for ``timeouts.stream_idle``
        raises :class:`StreamIdleTimeoutError`.
        """
        body = _execution_body(
            files,
            runtime=runtime,
            language=language,
            version=version,
            entry=entry,
            stdin=stdin,
            args=args,
            limits=limits,
            compile_limits=compile_limits,
            extra=extra_body,
        )
        return ExecutionStream(self._client, body, on_stdout, on_stderr)

    def run_code(
        self,
        code: Union[str, bytes],
        language: str,
        *,
        stdin: Union[str, bytes, None] = None,
        args: Optional[Sequence[str]] = None,
        limits: LimitsLike = None,
    ) -> ExecutionResult:
        """Runs one snippet: ``client.executions.run_code("print(1)", "python")``.

        ``language`` is a language (``python``), runtime id (``python-3.11``) or alias; the file is
        named as the runtime expects (its default entry, e.g. ``main.py``, ``Main.java``).
        """
        rt = _find_runtime(self._client.runtimes.list(), language)
        if rt is None:
            raise ValueError(f"the server has no runtime named {language!r}; see client.runtimes.list()")
        return self.create({_entry_name(rt): code}, runtime=rt.id, stdin=stdin, args=args, limits=limits)


class Runtimes:
    """``client.runtimes``: what the server can run."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def catalog(self) -> RuntimeList:
        """``GET /v1/runtimes``: every runtime and the server's maximum limits."""
        return _parse(RuntimeList, self._client._request("GET", "/v1/runtimes"))

    def list(self) -> List[Runtime]:
        """Every runtime of the server's catalog, in preference order (available or not: see ``available``)."""
        return self.catalog().runtimes


class Client:
    """A synchronous client for a TVM server.

    ``base_url`` defaults to ``$TVM_BASE_URL`` or ``http://127.0.0.1:8080``; ``api_key`` to
    ``$TVM_API_KEY``. ``max_retries`` applies only where retrying is safe (connection refused
    before anything was sent; 429/503 after waiting ``Retry-After``, up to ``max_retry_wait`` s).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeouts: Optional[Timeouts] = None,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        self.base_url, self.api_key = _settings(base_url, api_key)
        self.timeouts = timeouts or Timeouts()
        self._retry = _Retry(max_retries, max_retry_wait)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_headers(self.api_key),
            timeout=self.timeouts.for_request(),
            transport=transport,
        )
        self.executions = Executions(self)
        self.runtimes = Runtimes(self)
        self.sessions = Sessions(self)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                err: Exception = _transport_error(exc, _request_of(exc), streaming=False)
                err.__cause__ = exc
            else:
                if response.status_code < 400:
                    return response
                err = status_error(response)
            wait = self._retry.delay(attempt, err)
            if wait is None:
                if isinstance(err, APIConnectionError):
                    raise _public(err)
                raise err
            time.sleep(wait)
            attempt += 1

    def health(self) -> bool:
        """``GET /healthz``: whether the server process answers."""
        try:
            return self._request("GET", "/healthz").status_code == 200
        except (APIConnectionError, APIStatusError):
            return False

    def ready(self) -> bool:
        """``GET /readyz``: whether the server accepts executions (not draining, VM manager ready)."""
        try:
            return self._request("GET", "/readyz").status_code == 200
        except (APIConnectionError, APIStatusError):
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -------------------------------------------------------------------------- async


class AsyncExecutionStream:
    """The async twin of :class:`ExecutionStream`: ``async with`` / ``async for``."""

    def __init__(
        self,
        client: "AsyncClient",
        body: Dict[str, Any],
        on_stdout: Optional[OutputCallback],
        on_stderr: Optional[OutputCallback],
    ) -> None:
        self._client = client
        self._body = body
        self._on = {"stdout": on_stdout, "stderr": on_stderr}
        self._cm: Any = None
        self._response: Optional[httpx.Response] = None
        self.result: Optional[ExecutionResult] = None

    async def _open(self) -> httpx.Response:
        attempt = 0
        while True:
            cm = self._client._http.stream(
                "POST",
                "/v1/executions/stream",
                json=self._body,
                timeout=self._client.timeouts.for_stream(),
                headers={"accept": "text/event-stream"},
            )
            try:
                response = await cm.__aenter__()
            except httpx.HTTPError as exc:
                err: Exception = _transport_error(exc, None, streaming=True)
            else:
                if response.status_code == 200:
                    self._cm = cm
                    return response
                await response.aread()
                err = status_error(response)
                await cm.__aexit__(None, None, None)
            wait = self._client._retry.delay(attempt, err)
            if wait is None:
                if isinstance(err, APIConnectionError):
                    raise _public(err)
                raise err
            await asyncio.sleep(wait)
            attempt += 1

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._response is None:
            self._response = await self._open()
        decoder = SSEDecoder()
        try:
            async for chunk in self._response.aiter_bytes():
                for sse in decoder.feed(chunk):
                    event = self._event(sse.event, sse.data)
                    if event is not None:
                        yield event
                        if isinstance(event, ResultEvent):
                            return
        except httpx.HTTPError as exc:
            raise _public(_transport_error(exc, None, streaming=True)) from exc
        finally:
            await self.aclose()
        if self.result is None:
            raise APIConnectionError("the stream ended before the execution's result")

    _event = ExecutionStream._event

    async def until_done(self) -> ExecutionResult:
        """Consumes the stream (callbacks still fire) and returns the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            await cm.__aexit__(None, None, None)

    async def __aenter__(self) -> "AsyncExecutionStream":
        self._response = await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncExecutions:
    """``client.executions`` of :class:`AsyncClient`; same parameters as :class:`Executions`."""

    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def create(self, files: Files, **kwargs: Any) -> ExecutionResult:
        """See :meth:`Executions.create` (``tests`` included)."""
        body = _execution_body(files, **_kw(kwargs, tests=True))
        return _parse(ExecutionResult, await self._client._request("POST", "/v1/executions", json=body))

    def stream(
        self,
        files: Files,
        *,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        **kwargs: Any,
    ) -> AsyncExecutionStream:
        """See :meth:`Executions.stream`."""
        body = _execution_body(files, **_kw(kwargs))
        return AsyncExecutionStream(self._client, body, on_stdout, on_stderr)

    async def run_code(
        self,
        code: Union[str, bytes],
        language: str,
        *,
        stdin: Union[str, bytes, None] = None,
        args: Optional[Sequence[str]] = None,
        limits: LimitsLike = None,
    ) -> ExecutionResult:
        """See :meth:`Executions.run_code`."""
        rt = _find_runtime(await self._client.runtimes.list(), language)
        if rt is None:
            raise ValueError(f"the server has no runtime named {language!r}; see client.runtimes.list()")
        return await self.create({_entry_name(rt): code}, runtime=rt.id, stdin=stdin, args=args, limits=limits)


_KW = ("runtime", "language", "version", "entry", "stdin", "args", "limits", "compile_limits", "extra_body")


def _kw(kwargs: Dict[str, Any], *, tests: bool = False) -> Dict[str, Any]:
    """``kwargs`` of an async method as ``_execution_body``'s arguments; ``tests`` only where the method takes them."""
    allowed = set(_KW) | ({"tests"} if tests else set())
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
    out = {k: kwargs.get(k) for k in _KW}
    out["extra"] = out.pop("extra_body")
    if tests:
        out["tests"] = kwargs.get("tests")
    return out


class AsyncRuntimes:
    """``client.runtimes`` of :class:`AsyncClient`."""

    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def catalog(self) -> RuntimeList:
        return _parse(RuntimeList, await self._client._request("GET", "/v1/runtimes"))

    async def list(self) -> List[Runtime]:
        return (await self.catalog()).runtimes


class AsyncClient:
    """The asyncio twin of :class:`Client` (same arguments). Use ``async with`` or ``await close()``:
    the connection pool belongs to the event loop it was first used on."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeouts: Optional[Timeouts] = None,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.base_url, self.api_key = _settings(base_url, api_key)
        self.timeouts = timeouts or Timeouts()
        self._retry = _Retry(max_retries, max_retry_wait)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_headers(self.api_key),
            timeout=self.timeouts.for_request(),
            transport=transport,
        )
        self.executions = AsyncExecutions(self)
        self.runtimes = AsyncRuntimes(self)
        self.sessions = AsyncSessions(self)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                err: Exception = _transport_error(exc, _request_of(exc), streaming=False)
                err.__cause__ = exc
            else:
                if response.status_code < 400:
                    return response
                err = status_error(response)
            wait = self._retry.delay(attempt, err)
            if wait is None:
                if isinstance(err, APIConnectionError):
                    raise _public(err)
                raise err
            await asyncio.sleep(wait)
            attempt += 1

    async def health(self) -> bool:
        try:
            return (await self._request("GET", "/healthz")).status_code == 200
        except (APIConnectionError, APIStatusError):
            return False

    async def ready(self) -> bool:
        try:
            return (await self._request("GET", "/readyz")).status_code == 200
        except (APIConnectionError, APIStatusError):
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
