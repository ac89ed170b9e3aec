"""One exception tree for everything the client can raise.

A program's own failure (compile error, runtime error, time limit, ...) is
*not* an exception: it is the ``verdict`` of the result. Exceptions mean the
request could not be carried out: the server could not be reached, it refused
the request (4xx, with the server's ``code``/``field``/``message``), or it failed (5xx).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import httpx

__all__ = [
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


class PyroshellError(Exception):
    """Base of every error this package raises."""


class APIConnectionError(PyroshellError):
    """The server could not be reached, or the connection broke mid-request."""

    def __init__(self, message: str, *, request: Optional[httpx.Request] = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """Connecting or waiting for the response took longer than the configured timeout."""


class StreamIdleTimeoutError(APITimeoutError):
    """A stream sent nothing (not even a keep-alive) for ``Timeouts.stream_idle`` seconds."""


class SessionClosedError(APIConnectionError):
    """A session's WebSocket closed before its result, with no error the server explained
    (e.g. 1006: the connection dropped, or a close code this client does not know).

    ``close_code`` and ``reason`` are the close frame's (``None``/"" when none arrived).
    """

    def __init__(self, message: str, *, close_code: Optional[int] = None, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason


class APIResponseValidationError(PyroshellError):
    """The server answered 2xx (or sent a session message) with a body that is not the documented shape.

    ``response`` is ``None`` for session messages."""

    def __init__(self, message: str, *, response: Optional[httpx.Response] = None, body: Any = None) -> None:
        super().__init__(message)
        self.response = response
        self.body = body


class APIStatusError(PyroshellError):
    """The server answered with a 4xx or 5xx status.

    Attributes mirror the server's error document ``{"error": {"code", "message", "field"}}``.
    A session (``/v1/sessions``) refused with close code 4000 + status raises the same classes:
    then ``close_code`` is that code and ``response`` is built from the close frame and the
    server's ``error`` message (``status_code`` = close code - 4000); ``close_code`` is ``None``
    for HTTP answers.
    """

    close_code: Optional[int] = None

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        code: Optional[str] = None,
        field: Optional[str] = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.response = response
        self.status_code = response.status_code
        self.code = code
        self.field = field
        self.body = body
        self.request_id = response.headers.get("x-request-id")

    def __str__(self) -> str:
        parts = [f"HTTP {self.status_code}"]
        if self.code:
            parts.append(self.code)
        text = " ".join(parts) + f": {self.message}"
        if self.field:
            text += f" (field: {self.field})"
        return text


class BadRequestError(APIStatusError):
    """400: the body is not valid JSON or not the request shape."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class ForbiddenError(APIStatusError):
    """403: the request was refused (e.g. a Host header the server does not serve)."""


class NotFoundError(APIStatusError):
    """404: no such path."""


class MethodNotAllowedError(APIStatusError):
    """405: the path exists, the method does not."""


class RequestTimeoutError(APIStatusError):
    """408: the request body arrived too slowly."""


class PayloadTooLargeError(APIStatusError):
    """413: the body is larger than the server accepts."""


class UnsupportedMediaTypeError(APIStatusError):
    """415: the body was not sent as JSON."""


class UnprocessableEntityError(APIStatusError):
    """422: the request is well-formed but invalid (unknown runtime, bad file name, limit too high, ...)."""


class _RetryAfterMixin:
    retry_after: Optional[float]


class RateLimitError(APIStatusError, _RetryAfterMixin):
    """429: the server is at capacity and its queue is full or timed out; see ``retry_after``."""

    def __init__(self, *args: Any, retry_after: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class InternalServerError(APIStatusError):
    """5xx other than 503."""


class ServiceUnavailableError(InternalServerError, _RetryAfterMixin):
    """503: the server is draining (shutting down) or the runtime is not ready; see ``retry_after``.
    ``code == "runtime_unavailable"`` (no ``retry_after``): the runtime cannot run on that server until
    its operator acts (a failed image build, an unreachable registry); retrying does not help."""

    def __init__(self, *args: Any, retry_after: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: ForbiddenError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    408: RequestTimeoutError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: UnprocessableEntityError,
}


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    import datetime as _dt

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a 4xx/5xx response, carrying the server's error document when there is one."""
    body: Any = None
    code = field = None
    message = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        if text:
            message = text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = err.get("code") if isinstance(err.get("code"), str) else None
            field = err.get("field") if isinstance(err.get("field"), str) else None
            if isinstance(err.get("message"), str):
                message = err["message"]
        elif isinstance(body.get("message"), str):
            message = body["message"]
    kwargs = dict(response=response, code=code, field=field, body=body)
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        return RateLimitError(message, retry_after=retry_after, **kwargs)
    if status == 503:
        return ServiceUnavailableError(message, retry_after=retry_after, **kwargs)
    if status >= 500:
        return InternalServerError(message, **kwargs)
    return _BY_STATUS.get(status, APIStatusError)(message, **kwargs)


def session_close_error(close_code: Optional[int], reason: str, notice: Optional[Dict[str, Any]]) -> PyroshellError:
    """The exception for a session that closed without a result.

    Close codes 4000-4999 are 4000 + the HTTP status an equivalent request would get (``docs/compat.md``):
    they raise the status's :class:`APIStatusError` subclass with the ``error`` notice's
    ``code``/``field``/``message``. Anything else raises :class:`SessionClosedError`.
    """
    if close_code is not None and 4400 <= close_code <= 4599:
        err: Dict[str, Any] = {"code": reason or None, "message": reason or f"session closed with {close_code}"}
        if notice:
            err.update({k: notice.get(k) for k in ("code", "message", "field") if notice.get(k) is not None})
        response = httpx.Response(close_code - 4000, json={"error": err})
        out = status_error(response)
        out.close_code = close_code
        return out
    what = f"close code {close_code}" if close_code is not None else "no close frame"
    text = f"the session closed before its result ({what}"
    text += f": {reason})" if reason else ")"
    if notice and notice.get("message"):
        text += f"; server said: {notice['message']}"
    return SessionClosedError(text, close_code=close_code, reason=reason)
