"""Turning the many ways users name files into the API's ``files`` array."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Tuple, Union

#: File content: text (sent as UTF-8), exact bytes (sent as base64), or a path to read.
Content = Union[str, bytes, os.PathLike]

#: ``{"main.py": "print(1)"}``, ``[("main.py", b"...")]``, or paths (``["main.py", Path("util.py")]``, sent under their base names).
Files = Union[Mapping[str, Content], Iterable[Union[Tuple[str, Content], os.PathLike, str]]]


def _encode(content: Content) -> Dict[str, str]:
    if isinstance(content, os.PathLike):
        content = Path(content).read_bytes()
    if isinstance(content, str):
        return {"content": content}
    if isinstance(content, (bytes, bytearray, memoryview)):
        return {"content": base64.b64encode(bytes(content)).decode("ascii"), "encoding": "base64"}
    raise TypeError(f"file content must be str, bytes or a path, not {type(content).__name__}")


def to_body(files: Files) -> List[Dict[str, str]]:
    """The API's ``files``: ``[{"name", "content", "encoding"?}]``, in the order given (the first is the entry by default).

    A bare string in a list is a *path* to read; to send text, use a mapping or a ``(name, text)`` pair.
    """
    out: List[Dict[str, str]] = []
    if isinstance(files, Mapping):
        items: Iterable = files.items()
    elif isinstance(files, (str, bytes)):
        raise TypeError("files must be a mapping, a list of (name, content) pairs, or a list of paths")
    else:
        items = files
    for item in items:
        if isinstance(item, tuple):
            name, content = item
            out.append({"name": str(name), **_encode(content)})
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            out.append({"name": path.name, **_encode(path)})
        else:
            raise TypeError(f"cannot use {item!r} as a file")
    if not out:
        raise ValueError("at least one file is needed")
    return out


def stdin_body(stdin: Union[str, bytes, None]) -> Dict[str, str]:
    """``stdin`` (+ ``stdin_encoding``) for text or exact bytes."""
    if stdin is None:
        return {}
    if isinstance(stdin, str):
        return {"stdin": stdin}
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        return {"stdin": base64.b64encode(bytes(stdin)).decode("ascii"), "stdin_encoding": "base64"}
    raise TypeError(f"stdin must be str or bytes, not {type(stdin).__name__}")
