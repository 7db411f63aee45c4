"""Constrained decoding through the sampling parameters: callers pass a JSON schema (or a grammar),
the engine builds the grammar; the grammar module is the engine's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

import llmos
from llmos.engine import LLM, InvalidRequestError, SamplingParams

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_a_json_schema_constrains_the_output(smollm):
    llm = LLM(smollm, kv_budget="32MiB")
    params = SamplingParams(temperature=0, max_tokens=40, json_schema=PERSON)
    out = llm.chat([[{"role": "user", "content": "Describe a person as JSON."}]], params)[0].outputs[0]
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.finish_reason == "stop" and out.stop_reason is None  # the grammar completed


def test_schema_errors_are_request_errors(smollm):
    with pytest.raises(InvalidRequestError, match="give a grammar or a json_schema, not both"):
        SamplingParams(grammar="start: 'a'", json_schema=PERSON)
    with pytest.raises(InvalidRequestError, match="json_schema must be an object"):
        SamplingParams(json_schema="person")
    llm = LLM(smollm, kv_budget="32MiB")
    with pytest.raises(InvalidRequestError, match="bad grammar: Invalid type: no-such-type"):
        llm.engine.add_request([100, 200], SamplingParams(json_schema={"type": "no-such-type"}))
    assert not llm.engine.has_unfinished_requests()


def test_no_module_outside_the_engine_imports_its_grammar_module():
    root = Path(llmos.__file__).parent
    importers = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.parent.name != "engine" and re.search(r"^\s*(from|import) llmos\.engine\.guided\b",
                                                           p.read_text(), re.MULTILINE)]
    assert importers == []
