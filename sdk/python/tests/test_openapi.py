"""The SDK's models and the server's OpenAPI document must agree (a real server's /v1/openapi.json)."""

from __future__ import annotations

import typing
from typing import List

import httpx
import pytest

from pyroshell import ExecutionResult, Limits, LimitsInfo, Runtime, RuntimeList, Stage
from pyroshell._models import DefaultLimits, ExecutionTrace, ImageInfo, PoolInfo, TestCase, TestResult, TestSummary
from pyroshell._client import _execution_body

pytestmark = pytest.mark.integration

# SDK model -> the schema it mirrors in components/schemas.
PAIRS = [
    (ExecutionResult, "ExecutionResult"),
    (ExecutionTrace, "ExecutionTrace"),
    (Stage, "StageBody"),
    (LimitsInfo, "LimitsInfo"),
    (Limits, "LimitsBody"),
    (Runtime, "RuntimeInfo"),
    (RuntimeList, "RuntimesBody"),
    (ImageInfo, "ImageInfo"),
    (DefaultLimits, "DefaultLimits"),
    (PoolInfo, "PoolInfo"),
    (TestResult, "TestResultBody"),
    (TestSummary, "TestSummary"),
    (TestCase, "TestBody"),
]

JSON_TYPES = {int: "integer", bool: "boolean", str: "string", float: "number"}


@pytest.fixture(scope="module")
def schemas(server):
    doc = httpx.get(f"{server}/v1/openapi.json", timeout=10).json()
    return doc["components"]["schemas"]


def _resolve(schemas, s):
    while isinstance(s, dict) and "$ref" in s:
        s = schemas[s["$ref"].rsplit("/", 1)[-1]]
    return s


def _types(schemas, prop):
    """JSON types a property schema allows (through refs, oneOf/anyOf/allOf, nullable)."""
    prop = _resolve(schemas, prop)
    out = set()
    t = prop.get("type")
    if isinstance(t, list):
        out.update(t)
    elif t:
        out.add(t)
    for key in ("oneOf", "anyOf", "allOf"):
        for sub in prop.get(key, []):
            out |= _types(schemas, sub)
    if prop.get("nullable"):
        out.add("null")
    if "enum" in prop and not t:
        out.add("string")
    return out


def _json_types(ann):
    """JSON types of a Python annotation, or [] when it is a nested model (checked by its own pair)."""
    origin = typing.get_origin(ann)
    if origin in (list, List):
        return ["array"]
    if origin is typing.Literal:
        return ["string"]
    if origin is typing.Union:
        return [t for a in typing.get_args(ann) if a is not type(None) for t in _json_types(a)]
    return [JSON_TYPES[ann]] if ann in JSON_TYPES else []


@pytest.mark.parametrize("model,name", PAIRS, ids=[n for _, n in PAIRS])
def test_model_fields_match_the_schema(schemas, model, name):
    assert name in schemas, f"{name} is not in the server's OpenAPI document"
    schema = _resolve(schemas, schemas[name])
    props = schema.get("properties", {})
    fields = model.model_fields
    assert set(fields) == set(props), f"{model.__name__} vs {name}: sdk-only {set(fields) - set(props)}, server-only {set(props) - set(fields)}"
    for required in schema.get("required", []):
        assert fields[required].is_required() or required in ("compile", "run", "exit_code", "signal", "error") or fields[required].default is not None, \
            f"{name}.{required} is required by the server; the SDK model must not silently default it"
    for fname, f in fields.items():
        simple = _json_types(f.annotation)
        if simple:
            allowed = _types(schemas, props[fname])
            if allowed:
                assert set(simple) & allowed, f"{name}.{fname}: SDK {simple} vs server {allowed}"


def test_request_body_uses_only_documented_fields(schemas):
    props = set(_resolve(schemas, schemas["ExecutionBody"])["properties"])
    body = _execution_body(
        {"a.py": "x", "b.bin": b"\x00"}, runtime="python", language=None, version=None, entry="a.py",
        stdin=b"\x00", args=["1"], limits={"wall_time_ms": 1}, compile_limits={"memory_bytes": 1}, extra=None,
    )
    assert set(body) <= props, set(body) - props
    with_tests = _execution_body(
        {"a.py": "x"}, runtime="python", language=None, version=None, entry=None, stdin=None, args=None,
        limits=None, compile_limits=None, extra=None,
        tests=[TestCase(stdin=b"\x00", args=["1"], expected_output="x"), TestCase(stdin="t")],
    )
    assert "tests" in props
    test_props = set(_resolve(schemas, schemas["TestBody"])["properties"])
    assert set(with_tests["tests"][0]) == test_props, set(with_tests["tests"][0]) ^ test_props
    file_props = set(_resolve(schemas, schemas["FileBody"])["properties"])
    assert set(body["files"][1]) <= file_props
