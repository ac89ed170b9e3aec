"""pyroshell: the Python client of TVM, which runs untrusted code in fresh microVMs.

    from pyroshell import Client

    with Client("http://127.0.0.1:8080") as client:
        result = client.executions.create({"main.py": "print(input()[::-1])"}, language="python", stdin="olleh")
        print(result.verdict, result.stdout)

``client.executions.create(..., tests=[TestCase(stdin=..., expected_output=...)])`` compiles once
and runs once per test; ``client.sessions.start(...)`` runs a program interactively
(``send_stdin``, ``close_stdin``, ``signal``, typed events, ``wait()``).

A failing program is a ``verdict`` (``ok``, ``compile_error``, ``runtime_error``,
``time_limit_exceeded``, ...), not an exception; exceptions (all :class:`PyroshellError`)
mean the request itself could not be carried out.
"""

from ._client import DEFAULT_BASE_URL, AsyncClient, AsyncExecutionStream, Client, ExecutionStream, Timeouts
from ._errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ForbiddenError,
    InternalServerError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PyroshellError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
    SessionClosedError,
    StreamIdleTimeoutError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
)
from ._models import (
    DefaultLimits,
    ExecutionResult,
    ImageInfo,
    Limits,
    LimitsInfo,
    OutputEvent,
    PoolInfo,
    ResultEvent,
    Runtime,
    RuntimeList,
    Stage,
    StreamEvent,
    Verdict,
    StageEvent,
    ExitEvent,
    SessionEvent,
    TestCase,
    TestResult,
    TestSummary,
    TestVerdict,
)
from ._session import AsyncSession, Session
from ._version import __version__

__all__ = [
    "__version__",
    "DEFAULT_BASE_URL",
    "Client",
    "AsyncClient",
    "ExecutionStream",
    "AsyncExecutionStream",
    "Timeouts",
    "Session",
    "AsyncSession",
    "Limits",
    "LimitsInfo",
    "Stage",
    "ExecutionResult",
    "Verdict",
    "Runtime",
    "RuntimeList",
    "ImageInfo",
    "DefaultLimits",
    "PoolInfo",
    "TestCase",
    "TestResult",
    "TestSummary",
    "TestVerdict",
    "OutputEvent",
    "ResultEvent",
    "StreamEvent",
    "StageEvent",
    "ExitEvent",
    "SessionEvent",
    "PyroshellError",
    "APIConnectionError",
    "APITimeoutError",
    "StreamIdleTimeoutError",
    "SessionClosedError",
    "APIResponseValidationError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "ForbiddenError",
    "NotFoundError",
    "MethodNotAllowedError",
    "RequestTimeoutError",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "ServiceUnavailableError",
]
