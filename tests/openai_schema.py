"""Validate bodies against OpenAI's own spec (../shared/specs/openai-openapi.json).

The spec writes optional nulls OpenAPI-3.0 style (``nullable: true``); they are rewritten
to JSON Schema ``anyOf [..., null]`` before validation.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "specs" / "openai-openapi.json"


def _rewrite_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_rewrite_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rewrite_nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _registry() -> Registry:
    spec = _rewrite_nullable(json.loads(SPEC_PATH.read_text()))
    return Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012)
    )


@functools.cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{name}"}, registry=_registry()
    )


def assert_valid(name: str, body: Any) -> None:
    errors = sorted(validator(name).iter_errors(body), key=lambda e: list(e.path))
    if errors:
        detail = "\n".join(f"- {list(e.path)}: {e.message[:300]}" for e in errors[:5])
        raise AssertionError(f"body does not match {name}:\n{detail}\n{json.dumps(body)[:1000]}")
