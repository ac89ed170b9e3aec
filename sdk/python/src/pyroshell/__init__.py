"""pyroshell: the Python client of TVM, which runs untrusted code in fresh microVMs.

    from pyroshell import Client

    with Client("http://127.0.0.1:8080") as client:
        result = client.executions.create({"main.py": "print(input()[::-1])"}, language="python", stdin="olleh")
        print(result.verdict, result.stdout)

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
    TestResult,
    TestSummary,
    TestVerdict,
)
from ._version import __version__

__all__ = [
    "__version__",
    "DEFAULT_BASE_URL",
    "Client",
    "AsyncClient",
    "ExecutionStream",
    "AsyncExecutionStream",
    "Timeouts",
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
    "TestResult",
    "TestSummary",
    "TestVerdict",
    "OutputEvent",
    "ResultEvent",
    "StreamEvent",
    "PyroshellError",
    "APIConnectionError",
    "APITimeoutError",
    "StreamIdleTimeoutError",
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
