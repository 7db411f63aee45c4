"""`llmos bench programs`: the trace is seeded and has the issue's shape; one configuration against
another on the real engine gives identical tokens, and llmos passes context keys and takes a
retention decision per tool call, recomputing less."""

from __future__ import annotations

import asyncio

from llmos.bench.programs import FULL, ProgramsWorkload, make_trace, run_config


def test_the_trace_is_seeded_and_shaped_like_agent_programs():
    w = ProgramsWorkload()
    trace = make_trace(w)
    again = make_trace(w)
    assert [(p.arrival, p.prompt, [(s.tool, s.tool_s, s.result) for s in p.steps]) for p in trace] == \
        [(p.arrival, p.prompt, [(s.tool, s.tool_s, s.result) for s in p.steps]) for p in again]
    assert make_trace(ProgramsWorkload(seed=1))[0].prompt != trace[0].prompt
    assert len(trace) == w.programs and [p.arrival for p in trace] == sorted(p.arrival for p in trace)
    assert all(w.calls[0] <= p.num_calls <= w.calls[1] for p in trace)
    assert all(w.first_prompt[0] <= len(p.prompt) <= w.first_prompt[1] for p in trace)
    steps = [s for p in trace for s in p.steps]
    new = [len(s.result) + w.answer_tokens for s in steps]  # a call's new tokens: answer and result
    assert min(new) >= w.new_tokens[0] and max(new) <= w.new_tokens[1]
    assert all(w.tool_min_s <= s.tool_s <= w.tool_max_s for s in steps)
    times = sorted(s.tool_s for s in steps)
    assert times[-1] > 10 * times[len(times) // 2]  # long-tailed: the longest is far above the median
    full = make_trace(FULL)  # the size: several hundred calls of 64-256 new tokens
    assert sum(p.num_calls for p in full) >= 200
    assert all(64 <= len(s.result) + FULL.answer_tokens <= 256 for p in full for s in p.steps)


def test_llmos_retains_contexts_across_tool_calls_and_gives_the_tokens_of_fcfs():
    from llmos.engine import AsyncLLM
    from llmos.kernel import EngineBackend

    w = ProgramsWorkload(programs=2, calls=(3, 3), first_prompt=(40, 48), new_tokens=(20, 24),
                         answer_tokens=4, tool_median_s=0.01, arrival_mean_s=0.01, max_running=2,
                         kv_blocks=64)
    trace = make_trace(w)
    llm = AsyncLLM("smollm2-135m-instruct", kv_budget="16MiB", swap_space="16MiB")
    try:
        backend = EngineBackend(llm)
        fcfs, fcfs_run = asyncio.run(run_config(backend, "fcfs", w, trace))
        ours, ours_run = asyncio.run(run_config(backend, "llmos", w, trace))
    finally:
        llm.shutdown()
    assert ours_run.outputs == fcfs_run.outputs and len(ours_run.outputs) == 6
    assert fcfs["prompt_tokens_recomputed"] == fcfs["prompt_tokens"]  # no cache: everything again
    assert ours["prompt_tokens"] == fcfs["prompt_tokens"]
    # Each program's second and third calls found its context: only the new tokens were computed.
    assert ours["prompt_tokens_recomputed"] <= fcfs["prompt_tokens"] - 2 * 2 * 32
    assert sum(ours["retention"].values()) == 4 and "none" not in ours["retention"]  # 2 tools each
    assert ours["retention_engine"]["captured"] == 6 and ours["policy"] == "las"
