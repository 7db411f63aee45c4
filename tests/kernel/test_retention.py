"""KV retention across tool calls: the policy's choice on scripted costs, and the engine's
guarantees with the real model (reuse, exact tokens after a swap, memory pressure wins, TTL)."""

import asyncio

import pytest

from llmos.engine import LLMEngine, SamplingParams
from llmos.engine.retained import HOST_TTL
from llmos.kernel.retention import Memory, RetentionPolicy, ToolTimePredictor
from llmos.models.loader import load_model

# -- the policy ----------------------------------------------------------------


def test_keep_when_the_tool_is_short_and_memory_is_free():
    policy = RetentionPolicy()
    policy.predictor.observe("a", "calc", 0.05)
    free = Memory(capacity_blocks=1000, used_blocks=100, host_free_blocks=500)
    d = policy.decide("a", "calc", 10, 160, free)
    assert d.action == "keep" and d.costs["keep"] == 0.0
    assert d.ttl == policy.min_ttl  # 2 x 0.05 s is below the floor


def test_swap_a_long_tool_under_pressure_and_release_when_the_host_is_full():
    policy = RetentionPolicy()
    policy.predictor.observe("a", "search", 8.0)
    tight = Memory(capacity_blocks=1000, used_blocks=950, host_free_blocks=500)
    d = policy.decide("a", "search", 10, 160, tight)
    assert d.action == "swap" and d.ttl == 16.0
    assert d.costs["swap"] < d.costs["release"] < d.costs["keep"]
    full_host = Memory(capacity_blocks=1000, used_blocks=950, host_free_blocks=5)
    assert policy.decide("a", "search", 10, 160, full_host).action == "release"


def test_a_short_tool_keeps_even_under_pressure_and_a_long_one_does_not():
    policy = RetentionPolicy()
    policy.predictor.observe("a", "calc", 0.01)
    policy.predictor.observe("a", "search", 5.0)
    tight = Memory(capacity_blocks=1000, used_blocks=950, host_free_blocks=500)
    assert policy.decide("a", "calc", 10, 160, tight).action == "keep"
    assert policy.decide("a", "search", 10, 160, tight).action == "swap"


def test_a_measured_slow_prefill_makes_releasing_a_context_dearer_than_swapping_it():
    policy = RetentionPolicy()
    policy.predictor.observe("a", "search", 2.0)
    # Slight pressure: at the GPU-like default a token costs 2e-4 s to recompute, so dropping the
    # context (the prefix cache will likely keep it) is the cheapest waste.
    light = Memory(capacity_blocks=100, used_blocks=51, host_free_blocks=500)
    d = policy.decide("a", "search", 20, 320, light)
    assert d.action == "release" and d.costs["release"] < d.costs["swap"]
    # This engine measured 5 ms a token (a CPU): recomputing those 320 tokens is the dearest.
    cpu = Memory(capacity_blocks=100, used_blocks=51, host_free_blocks=500, prefill_s_per_token=5e-3)
    d = policy.decide("a", "search", 20, 320, cpu)
    assert d.action == "swap" and d.costs["swap"] < d.costs["release"]


def test_the_engine_measures_its_prefill_cost_a_token_on_prefill_steps(model):
    engine = LLMEngine(model, kv_budget="8MiB")
    assert engine.metrics.prefill_s_per_token == 0.0
    engine.add_request(list(range(1000, 1008)), SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.metrics.prefill_s_per_token == 0.0  # 8 tokens and decode steps: not a prefill's cost
    engine.add_request(list(range(1000, 1096)), SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    measured = engine.metrics.prefill_s_per_token
    assert 0.0 < measured < 1.0 and engine.stats()["prefill_s_per_token"] == measured
    engine.reset_metrics()
    assert engine.metrics.prefill_s_per_token == measured  # a fact of the machine, not a counter


def test_tool_time_is_learned_per_agent_and_tool_with_fallbacks():
    p = ToolTimePredictor(alpha=0.5, default=1.0)
    assert p.predict("a", "search") == 1.0
    p.observe("a", "search", 4.0)
    p.observe("a", "search", 2.0)
    assert p.predict("a", "search") == 3.0
    assert p.predict("b", "search") == 3.0  # another agent: the tool's mean
    p.observe("b", "search", 10.0)
    assert p.predict("b", "search") == 10.0 and p.predict("a", "search") == 3.0
    assert p.predict("b", "calc") == pytest.approx(0.2 * 10 + 0.8 * (0.2 * 2 + 0.8 * 4))  # all tools


# -- the engine ----------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2-135m-instruct")


def run(engine: LLMEngine, rid: str) -> None:
    while rid in engine.requests:
        engine.step()


def first_call(engine: LLMEngine, key: str = "pid-1") -> tuple[list[int], list[int]]:
    """A program's first call, retained under `key`; returns (its prompt, its context)."""
    prompt = list(range(1000, 1090))  # 90 tokens: 5 full blocks of 16 once the output is there
    rid = engine.add_request(prompt, GREEDY, request_id="call-1")
    engine.scheduler.retained.retain_on_finish[rid] = key
    outputs = []
    while rid in engine.requests:
        outputs += [o for o in engine.step() if o.finished]
    return prompt, prompt + outputs[0].outputs[0].token_ids


def next_call(engine: LLMEngine, context: list[int], key: str = "pid-1") -> tuple[list[int], int]:
    """The call after the tool: the context plus the tool's result; returns (tokens, cached)."""
    rid = engine.add_request(context + list(range(2000, 2020)), GREEDY, request_id="call-2")
    engine.scheduler.retained.claims[rid] = key
    outputs = []
    while rid in engine.requests:
        outputs += [o for o in engine.step() if o.finished]
    return outputs[0].outputs[0].token_ids, outputs[0].num_cached_tokens


def reference(model, context: list[int]) -> list[int]:
    engine = LLMEngine(model, kv_budget="16MiB", enable_prefix_caching=False)
    rid = engine.add_request(context + list(range(2000, 2020)), GREEDY)
    outputs = []
    while rid in engine.requests:
        outputs += [o for o in engine.step() if o.finished]
    return outputs[0].outputs[0].token_ids


def test_a_kept_context_is_reused_by_the_next_call(model):
    engine = LLMEngine(model, kv_budget="16MiB")
    _, context = first_call(engine)
    retained = engine.scheduler.retained
    assert retained.keep("pid-1", ttl=60) and retained.device_blocks() == len(context) // 16
    tokens, cached = next_call(engine, context)
    assert cached == len(context) // 16 * 16  # every full block of the context was a hit
    assert tokens == reference(model, context)
    assert retained.contexts == {} and retained.stats.reused_tokens == cached
    assert engine.blocks.num_used_blocks == 0  # the pin was handed over, then freed with the call


def test_a_context_swapped_during_the_tool_resumes_with_the_tokens_of_an_unpreempted_run(model):
    engine = LLMEngine(model, kv_budget="16MiB")
    _, context = first_call(engine)
    retained = engine.scheduler.retained
    assert retained.swap_out("pid-1")
    engine.step()  # the copy to host happens at the next step
    engine.blocks.reset_prefix_cache()  # the device copy is lost: only the host copy is left
    host_free = engine.scheduler.swap.num_free_blocks
    tokens, cached = next_call(engine, context)
    assert retained.stats.swapped_in_blocks == len(context) // 16
    assert cached == len(context) // 16 * 16  # swapped in, not recomputed
    assert tokens == reference(model, context)
    assert engine.scheduler.swap.num_free_blocks == host_free + len(context) // 16  # host blocks freed


def test_pinned_blocks_never_block_the_admission_of_a_new_request(model):
    engine = LLMEngine(model, kv_budget="16MiB")
    _, context = first_call(engine)
    retained = engine.scheduler.retained
    retained.keep("pid-1", ttl=3600)
    pinned = retained.device_blocks()
    engine.set_kv_capacity(pinned + 3)  # a new 80-token prompt needs 5 blocks: only 3 are free
    rid = engine.add_request(list(range(5000, 5080)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.requests[rid].seqs[0].num_computed_tokens == 80  # admitted in the first step
    assert retained.device_blocks() == 0 and retained.stats.reclaimed == 1
    assert retained.contexts["pid-1"].on_host  # the host had room: swapped there, not lost
    assert engine.scheduler.stats.preemptions == 0
    run(engine, rid)
    engine.set_kv_capacity(engine.blocks.num_blocks)
    tokens, cached = next_call(engine, context)  # and the next call still finds its context
    assert cached == len(context) // 16 * 16 and tokens == reference(model, context)


def test_pinned_blocks_are_released_when_the_host_is_full_too(model):
    engine = LLMEngine(model, kv_budget="16MiB", swap_space=0)
    first_call(engine)
    retained = engine.scheduler.retained
    retained.keep("pid-1", ttl=3600)
    engine.set_kv_capacity(retained.device_blocks() + 3)
    rid = engine.add_request(list(range(5000, 5080)), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert engine.requests[rid].seqs[0].num_computed_tokens == 80
    assert retained.contexts == {} and engine.scheduler.stats.preemptions == 0
    run(engine, rid)


def test_ttl_expiry_frees_the_blocks(model):
    engine = LLMEngine(model, kv_budget="16MiB")
    now = [0.0]
    engine.scheduler.retained.clock = lambda: now[0]
    first_call(engine)
    retained = engine.scheduler.retained
    retained.keep("pid-1", ttl=2.0)
    used, host_free = engine.blocks.num_used_blocks, engine.scheduler.swap.num_free_blocks
    assert used == retained.device_blocks() > 0
    now[0] = 1.9
    engine.step()
    assert engine.blocks.num_used_blocks == used
    now[0] = 2.0
    engine.step()
    assert engine.blocks.num_used_blocks == 0 and retained.stats.expired == 1  # the device is free
    assert retained.contexts["pid-1"].on_host  # its copy waits on the host for HOST_TTL more
    assert engine.scheduler.swap.num_free_blocks == host_free - used
    now[0] = 2.0 + HOST_TTL
    engine.step()
    engine.step()  # host blocks are freed at the step after the release
    assert retained.contexts == {} and retained.stats.expired == 2
    assert engine.scheduler.swap.num_free_blocks == host_free


def test_a_process_next_call_reuses_its_kept_context_through_the_backend(llm):
    from llmos.kernel import AgentScheduler, EngineBackend, LLMCall, SchedulerSettings
    from llmos.kernel.backend import GenerationParams, new_call_id

    backend = EngineBackend(llm)
    backend.attach(AgentScheduler(SchedulerSettings(policy="las")), lambda call, started: None)
    retained = llm.engine.scheduler.retained
    params = GenerationParams(max_tokens=8, ignore_eos=True)

    async def program() -> None:
        prompt = list(range(3000, 3090))
        first = LLMCall(new_call_id(), 7, max_tokens=8)
        await backend.complete(first, prompt, params, lambda n: None, context="pid-7")
        decision = await backend.between_calls("pid-7", "agent", "calc")
        assert decision.action == "keep" and retained.contexts["pid-7"].expires < float("inf")
        backend.tool_finished("agent", "calc", 0.01)
        reused = retained.stats.reused_tokens
        second = LLMCall(new_call_id(), 7, max_tokens=8)
        await backend.complete(second, prompt + first.output_ids + list(range(4000, 4020)), params,
                               lambda n: None, context="pid-7")
        assert second.cached_tokens == 96 == retained.stats.reused_tokens - reused  # 98 tokens: 6 blocks
        await backend.forget("pid-7")  # the second call's context is retained until the process ends
        assert "pid-7" not in retained.contexts
        stats = await backend.stats()
        assert stats["kv_retention_kept"] >= 1 and stats["kv_retention_reused_tokens"] >= 96
        assert stats["kv_retained_contexts"] == len(retained.contexts)

    asyncio.run(program())
