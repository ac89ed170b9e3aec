"""An incremental parser for server-sent events (the WHATWG ``text/event-stream`` rules we need).

Bytes arrive in arbitrary pieces: a frame may be split anywhere, even inside a
multi-byte character or between ``\\r`` and ``\\n``. Comment lines (``:``, the
server's keep-alives) are ignored but still count as activity for the idle timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ServerSentEvent:
    event: str
    data: str


@dataclass
class SSEDecoder:
    """Feed bytes with :meth:`feed`; it returns the events completed so far."""

    _buf: bytes = b""
    _event: Optional[str] = None
    _data: List[str] = field(default_factory=list)
    _pending_cr: bool = False

    def feed(self, chunk: bytes) -> List[ServerSentEvent]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        self._buf += chunk
        events: List[ServerSentEvent] = []
        while True:
            idx = _line_end(self._buf)
            if idx is None:
                break
            end, nxt = idx
            line = self._buf[:end]
            if self._buf[end : end + 1] == b"\r" and nxt == len(self._buf):
                # "\r" at the very end: a following "\n" may still arrive and belongs to this line.
                self._pending_cr = True
            self._buf = self._buf[nxt:]
            ev = self._line(line.decode("utf-8", errors="replace"))
            if ev is not None:
                events.append(ev)
        return events

    def _line(self, line: str) -> Optional[ServerSentEvent]:
        if line == "":
            if not self._data and self._event is None:
                return None
            ev = ServerSentEvent(event=self._event or "message", data="\n".join(self._data))
            self._event, self._data = None, []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def _line_end(buf: bytes):
    """(end of line, start of next) for the first complete line, or None."""
    for i, b in enumerate(buf):
        if b == 0x0A:  # \n
            return i, i + 1
        if b == 0x0D:  # \r or \r\n
            if i + 1 < len(buf) and buf[i + 1] == 0x0A:
                return i, i + 2
            return i, i + 1
    return None
