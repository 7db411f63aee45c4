"""`llmos lab context`: the MemGPT agent's main context on a small window warns, flushes to recall storage,
never sends a prompt that overflows the window, and pages the evicted fact back in on the question."""

import json

import pytest

from llmos.lab import run_lab


@pytest.fixture(scope="module")
def result(model, tmp_path_factory):
    return run_lab("context", tmp_path_factory.mktemp("lab"), "small", model=model)


def test_no_prompt_overflows_the_window(result):
    d = result.data
    assert json.loads(result.json_path.read_text()) == d
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert d["budget"] == d["window"] - d["reply_tokens"]
    assert all(s["prompt_tokens"] <= d["budget"] for s in d["steps"])
    assert d["overflows"] == 0 and d["largest_prompt_plus_reply"] <= d["window"]
    assert d["llm_calls"] > len(d["steps"])  # the summaries were LLM calls too, and fit as well
    assert max(s["queue_tokens"] for s in d["steps"]) > d["window"]  # without paging it would have overflowed


def test_pressure_warns_then_flushes_at_the_thresholds(result):
    d, steps = result.data, result.data["steps"]
    for s in steps:
        if s["queue_tokens"] > d["flush_tokens"]:
            assert s["flushes"] >= 1 and s["evicted"] >= 1, s  # over the budget: always flushed
        if s["queue_tokens"] <= d["warning_tokens"]:
            assert not s["warning"] and s["flushes"] == 0, s  # under the warning line: nothing happens
        if s["warning"]:
            assert s["queue_tokens"] > d["warning_tokens"]
        assert (s["summary"] is not None) == (s["flushes"] > 0)
    assert sum(s["evicted"] for s in steps) == d["evictions"] > 0
    assert sum(s["flushes"] for s in steps) == d["summaries"]
    assert any(s["warning"] for s in steps)
    question = max(s["turn"] for s in steps)
    assert any(s["flushes"] for s in steps if s["turn"] < question)  # paged out before the question


def test_the_question_pages_the_evicted_fact_back_in_from_recall_storage(result):
    d = result.data
    assert d["fact_evicted_before_question"] is True
    assert d["fact_in_recall_storage"] is True and d["fact_in_context_at_end"] is False
    r = d["recall"]
    assert r["tool"] == "conversation_search" and r["query"] in d["question"] and r["query"] in d["fact"]
    assert r["hit"] is True and d["fact"] in r["result"]
    assert d["steps"][r["step"]]["turn"] == d["turns"] - 1  # the search was the question turn's first step
    assert "found it in recall storage: True" in result.summary and "overflows: 0" in result.summary
