#!/usr/bin/env python3
"""Writes a copy of catalog/runtimes.toml that keeps only some runtimes.

A container carries the images of a few runtimes; its catalog must list exactly those, because
`tvm serve` is ready only when every runtime of its catalog has its image. Runtimes keep their
recipes byte for byte, so they find the same content-addressed images.

    catalog-subset.py CATALOG (--defaults | ID...) > subset.toml

--defaults keeps what `tvm image build --defaults` builds: for every file extension, the first
available runtime listing it. Prints the kept ids to stderr. Exits 2 on an unknown id.
"""

import re
import sys
import tomllib


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    text = open(argv[0], encoding="utf-8").read()
    runtimes = tomllib.loads(text)["runtime"]
    available = [r for r in runtimes if "unavailable" not in r]
    if argv[1:] == ["--defaults"]:
        keep = []
        for r in available:
            for ext in r.get("extensions", []):
                first = next(x for x in available if ext in x.get("extensions", []))
                if first["id"] == r["id"] and r["id"] not in keep:
                    keep.append(r["id"])
    else:
        keep = argv[1:]
        known = {r["id"] for r in available}
        unknown = [i for i in keep if i not in known]
        if unknown:
            print(f"unknown or unavailable runtime(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
    # Split before every [[runtime]] header: each chunk holds one runtime and its sub-tables.
    head, *blocks = re.split(r"(?m)^(?=\[\[runtime\]\]\s*$)", text)
    out = [head]
    for block in blocks:
        rid = tomllib.loads(block)["runtime"][0]["id"]
        if rid in keep:
            out.append(block)
    result = "".join(out)
    assert sorted(r["id"] for r in tomllib.loads(result)["runtime"]) == sorted(keep)
    sys.stdout.write(result)
    print(" ".join(keep), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
