"""``pyroshell run FILE... [--language L]`` and ``pyroshell runtimes``: a small CLI over :class:`Client`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ._client import Client
from ._errors import PyroshellError

_EXIT = {"compile_error": 1, "time_limit_exceeded": 124, "memory_limit_exceeded": 137, "output_limit_exceeded": 125, "internal_error": 70}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pyroshell", description="Run programs on a TVM server ($TVM_BASE_URL, $TVM_API_KEY).")
    p.add_argument("--base-url")
    p.add_argument("--api-key")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run files (the first is the entry)")
    run.add_argument("files", nargs="+")
    run.add_argument("--runtime", help="runtime id or alias (default: from --language)")
    run.add_argument("--language", help="language, e.g. python (default: guessed by the server from --runtime)")
    run.add_argument("--stdin", help="file to use as standard input ('-' for this process's stdin)")
    run.add_argument("--json", action="store_true", help="print the whole result document")
    run.add_argument("args", nargs=argparse.REMAINDER, help="after --: program arguments")
    rts = sub.add_parser("runtimes", help="list runtimes")
    rts.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        with Client(a.base_url, a.api_key) as client:
            if a.cmd == "runtimes":
                runtimes = client.runtimes.list()
                if a.json:
                    print(json.dumps([r.model_dump() for r in runtimes], indent=2))
                else:
                    for r in runtimes:
                        print(f"{r.id:<16} {r.language:<12} {r.version:<8} {r.image.state}")
                return 0
            stdin = None
            if a.stdin == "-":
                stdin = sys.stdin.buffer.read()
            elif a.stdin:
                with open(a.stdin, "rb") as f:
                    stdin = f.read()
            if not a.runtime and not a.language:
                p.error("give --runtime or --language")
            args = a.args[1:] if a.args[:1] == ["--"] else a.args
            result = client.executions.create(a.files, runtime=a.runtime, language=a.language, stdin=stdin, args=args)
    except PyroshellError as e:
        print(f"pyroshell: {e}", file=sys.stderr)
        return 2 if getattr(e, "status_code", 0) in (400, 413, 415, 422) else 70
    if a.json:
        print(result.model_dump_json(indent=2))
    else:
        for stage in (result.compile, result.run):
            if stage is not None:
                sys.stdout.buffer.write(stage.stdout_bytes)
                sys.stderr.buffer.write(stage.stderr_bytes)
    if result.verdict == "runtime_error" and result.run is not None:
        if result.run.signal:
            return 128 + result.run.signal
        return result.run.exit_code or 1
    return _EXIT.get(result.verdict, 0 if result.ok else 1)


if __name__ == "__main__":
    sys.exit(main())
