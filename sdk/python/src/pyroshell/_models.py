"""Typed models of the TVM API v1 (``GET /v1/openapi.json``).

Response models allow unknown fields, so a newer server never breaks an
older client; ``tests/test_openapi.py`` fails when these models and the
server's OpenAPI document disagree on a field.
"""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Verdict",
    "StageStatus",
    "Limits",
    "LimitsInfo",
    "Stage",
    "ExecutionResult",
    "ImageInfo",
    "DefaultLimits",
    "PoolInfo",
    "Runtime",
    "RuntimeList",
    "OutputEvent",
    "ResultEvent",
    "StreamEvent",
    "TestCase",
    "TestResult",
    "TestSummary",
    "TestVerdict",
    "StageEvent",
    "ExitEvent",
    "SessionEvent",
]

#: How an execution ended. ``ok`` is the only success; the rest are data, not exceptions.
Verdict = Literal[
    "ok",
    "compile_error",
    "runtime_error",
    "time_limit_exceeded",
    "memory_limit_exceeded",
    "output_limit_exceeded",
    "internal_error",
]

#: How one stage (compile or run) ended.
StageStatus = str


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Limits(BaseModel):
    """Per-stage limits for a request; unset fields keep the runtime's default.

    Units are in the names: milliseconds, bytes, counts.
    """

    model_config = ConfigDict(extra="forbid")

    wall_time_ms: Optional[int] = Field(default=None, ge=1)
    cpu_time_ms: Optional[int] = Field(default=None, ge=1)
    memory_bytes: Optional[int] = Field(default=None, ge=1)
    processes: Optional[int] = Field(default=None, ge=1)
    output_bytes: Optional[int] = Field(default=None, ge=1)
    file_size_bytes: Optional[int] = Field(default=None, ge=1)

    def to_body(self) -> Dict[str, int]:
        return self.model_dump(exclude_none=True)


class LimitsInfo(_Response):
    """Limits in force for one stage (ms, bytes, counts)."""

    wall_time_ms: int
    cpu_time_ms: int
    memory_bytes: int
    processes: int
    output_bytes: int
    file_size_bytes: int
    #: The stack may grow as far as memory does (as on judges); the server reports the bound it enforces.
    stack_bytes: int = 0


def _exact(text: str, b64: Optional[str]) -> bytes:
    if b64 is not None:
        return base64.b64decode(b64)
    return text.encode("utf-8")


class Stage(_Response):
    """What one stage did: output (text and exact bytes), exit, times, memory."""

    status: StageStatus
    exit_code: Optional[int] = None
    signal: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    stdout_base64: Optional[str] = None
    stderr_base64: Optional[str] = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time_ms: int = 0
    cpu_time_ms: int = 0
    peak_memory_bytes: int = 0

    @property
    def stdout_bytes(self) -> bytes:
        """The exact bytes the program wrote to stdout (``stdout`` replaces invalid UTF-8)."""
        return _exact(self.stdout, self.stdout_base64)

    @property
    def stderr_bytes(self) -> bytes:
        """The exact bytes the program wrote to stderr."""
        return _exact(self.stderr, self.stderr_base64)


TestVerdict = Literal[
    "accepted",
    "wrong_answer",
    "runtime_error",
    "time_limit_exceeded",
    "memory_limit_exceeded",
    "output_limit_exceeded",
]


class TestCase(BaseModel):
    """One test of a compile-once-run-many execution (server schema ``TestBody``).

    ``stdin``: text (sent as UTF-8) or exact bytes (sent as base64, ``stdin_encoding`` set for you).
    ``expected_output``: when given, a run that exits 0 is ``accepted`` if its stdout equals this
    with each line's trailing whitespace and trailing blank lines ignored (Judge0's rule), else
    ``wrong_answer``; without it, exiting 0 is ``accepted``.
    """

    __test__ = False  # not a pytest class
    model_config = ConfigDict(extra="forbid")

    stdin: Optional[Union[str, bytes]] = None
    #: ``utf8`` or ``base64``; set automatically when ``stdin`` is bytes.
    stdin_encoding: Optional[Literal["utf8", "base64"]] = None
    args: List[str] = []
    expected_output: Optional[str] = None

    @field_validator("args", mode="before")
    @classmethod
    def _args_as_text(cls, v: Any) -> Any:
        # As the top-level ``args``: numbers are sent as their text.
        if isinstance(v, (list, tuple)):
            return [str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a for a in v]
        return v

    def to_body(self) -> Dict[str, Any]:
        """The request's ``tests[i]`` object."""
        body: Dict[str, Any] = {}
        if isinstance(self.stdin, bytes):
            body["stdin"] = base64.b64encode(self.stdin).decode("ascii")
            body["stdin_encoding"] = "base64"
        elif self.stdin is not None:
            body["stdin"] = self.stdin
            if self.stdin_encoding is not None:
                body["stdin_encoding"] = self.stdin_encoding
        if self.args:
            body["args"] = [str(a) for a in self.args]
        if self.expected_output is not None:
            body["expected_output"] = self.expected_output
        return body


class TestResult(_Response):
    """One test of a compile-once-run-many execution (server schema ``TestResultBody``)."""

    __test__ = False  # not a pytest class

    index: int
    verdict: TestVerdict
    #: The comparison rule used when ``expected_output`` was given (``trailing_whitespace``).
    comparison: Optional[str] = None
    run: Stage


class TestSummary(_Response):
    """Counts over the tests of a compile-once-run-many execution; times in ms, memory in bytes."""

    __test__ = False  # not a pytest class

    total: int
    ran: int
    accepted: int
    failed: int
    max_wall_time_ms: int
    max_cpu_time_ms: int
    max_peak_memory_bytes: int


class TraceMark(_Response):
    """One step of the guest agent's work: the step just finished and when (µs since it decoded the job)."""

    step: str
    at_us: int


class ExecutionTrace(_Response):
    """Where an execution's time went; sent by servers started with ``--trace``.

    ``execute_us`` is the host's (job sent to result read), ``agent`` the guest's steps in order.
    """

    execute_us: int
    agent: List[TraceMark]


class ExecutionResult(_Response):
    """The outcome of one execution. A failing program is a verdict here, not an exception."""

    id: str
    verdict: Verdict
    runtime: str
    compile: Optional[Stage] = None
    run: Optional[Stage] = None
    error: Optional[str] = None
    boot_ms: int = 0
    queue_ms: int = 0
    total_ms: int = 0
    accel: str = ""
    pooled: bool = False
    #: How the VM started: ``template`` (restored snapshot), ``pool`` (pre-booted) or ``cold`` (booted for this request).
    start: str = ""
    #: Per-test outcomes when the request had ``tests`` (then ``run`` is absent).
    tests: Optional[List[TestResult]] = None
    #: Counts over ``tests``.
    summary: Optional[TestSummary] = None
    #: Why the VM booted cold although templates are on; absent otherwise.
    start_note: Optional[str] = None
    #: Where the time went, from a server started with ``--trace``; absent otherwise.
    trace: Optional[ExecutionTrace] = None

    @property
    def ok(self) -> bool:
        """Whether the program compiled (if needed), ran and exited 0 within its limits.

        With ``tests``, whether the build went through and every test ran; see :attr:`all_accepted`.
        """
        return self.verdict == "ok"

    @property
    def all_accepted(self) -> bool:
        """With ``tests``: whether every requested test ran and was ``accepted`` (``False`` without tests)."""
        return self.summary is not None and self.summary.total > 0 and self.summary.accepted == self.summary.total

    @property
    def stdout(self) -> str:
        """The run stage's stdout ("" when it did not run)."""
        return self.run.stdout if self.run else ""

    @property
    def stderr(self) -> str:
        """The run stage's stderr, or the compiler's when compilation failed."""
        if self.run is not None:
            return self.run.stderr
        return self.compile.stderr if self.compile else ""

    @property
    def exit_code(self) -> Optional[int]:
        """The run stage's exit code, when it exited."""
        return self.run.exit_code if self.run else None


class ImageInfo(_Response):
    state: str
    reason: Optional[str] = None


class DefaultLimits(_Response):
    run: LimitsInfo
    compile: Optional[LimitsInfo] = None


class PoolInfo(_Response):
    target: int = 0
    idle: int = 0
    memory_mib: int = 0


class Runtime(_Response):
    """One runtime of the server's catalog."""

    id: str
    language: str
    version: str
    aliases: List[str] = []
    extensions: List[str] = []
    compiled: bool = False
    entry: str = ""
    image: ImageInfo
    default_limits: DefaultLimits
    pool: PoolInfo = PoolInfo()
    #: Where the server's catalog entry was defined: "built-in", the catalog
    #: file, or the overlay file that added or last changed it.
    source: str = "built-in"

    @property
    def available(self) -> bool:
        """Whether the server can run it (its image is ready or can be built)."""
        return self.image.state != "unavailable"


class RuntimeList(_Response):
    runtimes: List[Runtime]
    maximum_limits: LimitsInfo


class OutputEvent(_Response):
    """A chunk of output as it happened: ``stream`` is ``stdout`` or ``stderr``, ``stage`` ``compile`` or ``run``."""

    stream: Literal["stdout", "stderr"]
    stage: str
    data: str


class ResultEvent(_Response):
    """The last event of a stream: the complete result (same shape as ``executions.create``)."""

    result: ExecutionResult


StreamEvent = Union[OutputEvent, ResultEvent]


class StageEvent(_Response):
    """Session event: a stage (``compile`` or ``run``) starts."""

    stage: str


class ExitEvent(_Response):
    """Session event: a stage ended. ``status`` as in :class:`Stage` (``ok``, ``failed``,
    ``time_limit_exceeded``, ...);
    ``exit_code`` when it exited, ``signal`` (Linux number) when a signal ended it."""

    stage: str
    status: str
    exit_code: Optional[int] = None
    signal: Optional[int] = None


#: What iterating a session yields: stage starts, output chunks, stage exits, and last the result.
SessionEvent = Union[StageEvent, OutputEvent, ExitEvent, ResultEvent]


def parse_session_event(data: Dict[str, Any]) -> Optional[SessionEvent]:
    """The typed event for a session message (its ``type`` removed); ``None`` for types this client does not know."""
    kind = data.get("type")
    fields = {k: v for k, v in data.items() if k != "type"}
    if kind in ("stdout", "stderr"):
        return OutputEvent(stream=kind, **fields)
    if kind == "stage":
        return StageEvent(**fields)
    if kind == "exit":
        return ExitEvent(**fields)
    if kind == "result":
        return ResultEvent(result=ExecutionResult.model_validate(fields))
    return None


def parse_stream_event(name: str, data: Any) -> Optional[StreamEvent]:
    """The typed event for an SSE ``event:`` name and its decoded JSON data; ``None`` for unknown events."""
    if name in ("stdout", "stderr") and isinstance(data, dict):
        return OutputEvent(stream=name, **data)
    if name == "result" and isinstance(data, dict):
        return ResultEvent(result=ExecutionResult.model_validate(data))
    return None
