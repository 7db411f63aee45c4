"""The engine on the real embedded model: outputs, sharing, preemption, sampling, errors."""

import asyncio

import pytest
import torch

from llmos.engine import LLM, AsyncLLM, InvalidRequestError, LLMEngine, SamplingParams
from tests.engine.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=16)
QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Write a haiku about memory.", "What is 12 times 12?"]


def dense_greedy(loaded, ids: list[int], n: int) -> list[int]:
    """Reference decoding: the whole sequence through the model each step, no KV cache."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            x = torch.tensor(ids)
            hidden = loaded.model(x, torch.arange(len(ids)))
            token = int(loaded.model.compute_logits(hidden[-1:]).argmax())
            out.append(token)
            ids.append(token)
    return out


def chat_ids(loaded, question: str) -> list[int]:
    return loaded.tokenizer.encode_chat([{"role": "user", "content": question}])


def test_batched_paged_greedy_equals_dense_reference(smollm):
    # A small token budget forces chunked prefill beside decodes; block size 4 gives many blocks.
    llm = LLM(smollm, kv_budget="64MiB", block_size=4, max_num_batched_tokens=24)
    prompts = [chat_ids(smollm, q) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == dense_greedy(smollm, prompt, 12)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_chat_answer_and_eos(smollm):
    llm = LLM(smollm, kv_budget="32MiB")
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                   SamplingParams(temperature=0, max_tokens=40))[0]
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == 2  # <|im_end|>, the model's EOS


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_outputs_exact(smollm, mode):
    prompts = random_prompts(10, 24, 96, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=8 + 4 * i, ignore_eos=True) for i in range(10)]
    reference = LLM(smollm, kv_budget="64MiB").generate(prompts, params)
    need_blocks = sum(-(-(len(p) + sp.max_tokens) // 16) for p, sp in zip(prompts, params, strict=True))
    block_bytes = smollm.config.kv_bytes_per_token * 16 * 4
    llm = LLM(smollm, kv_budget=need_blocks // 4 * block_bytes, preemption_mode=mode)
    outs = llm.generate(prompts, params)
    stats = llm.engine.scheduler.stats
    assert stats.preemptions > 0
    assert (stats.swap_outs > 0) == (mode == "swap")
    assert (stats.recomputes > 0) == (mode == "recompute")
    for ref, out in zip(reference, outs, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert llm.engine.scheduler.swap.num_free_blocks == llm.engine.scheduler.swap.num_blocks


def test_prefix_cache_serves_shared_prefix(smollm):
    prefix = random_prompts(1, 256, 256, seed=2)[0]
    suffixes = random_prompts(8, 8, 40, seed=3)
    prompts = [prefix + s for s in suffixes]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(smollm, kv_budget="64MiB")
    outs = llm.generate(prompts, params)
    shareable = (len(prompts) - 1) * len(prefix)
    hits = sum(o.num_cached_tokens for o in outs)
    assert hits >= 0.9 * shareable
    assert llm.engine.stats()["prefix_cache_hits"] == hits
    cold = LLM(smollm, kv_budget="64MiB", enable_prefix_caching=False).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in cold]
    assert sum(o.num_cached_tokens for o in cold) == 0


def test_n_samples_share_prompt_blocks_copy_on_write(smollm):
    engine = LLMEngine(smollm, kv_budget="32MiB")
    prompt = random_prompts(1, 40, 40, seed=4)[0]  # 40 tokens: the last block is partial
    engine.add_request(prompt, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True))
    engine.step()  # prefill, then fork into 3 sequences sharing 3 blocks
    seqs = engine.requests["0"].seqs
    assert len(seqs) == 3
    assert all(s.block_table == seqs[0].block_table for s in seqs)
    assert engine.blocks.num_used_blocks == 3
    engine.step()  # each writes its token into the shared partial block: two copy it
    tables = [s.block_table for s in seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    assert engine.blocks.num_used_blocks == 5
    final = None
    while engine.has_unfinished_requests():
        final = engine.step()[-1]
    texts = [o.token_ids for o in final.outputs]
    assert len(set(map(tuple, texts))) > 1  # different samples
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    again = LLM(smollm, kv_budget="32MiB").generate(
        prompt, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == texts


def test_seeded_sampling_is_independent_of_batch(smollm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=10, ignore_eos=True)
    prompt = chat_ids(smollm, "Tell me a story.")
    alone = LLM(smollm, kv_budget="32MiB").generate(prompt, params)[0].outputs[0].token_ids
    others = random_prompts(3, 20, 60, seed=5)
    batch = LLM(smollm, kv_budget="32MiB").generate(
        [*others, prompt], [SamplingParams(max_tokens=5)] * 3 + [params])
    assert batch[-1].outputs[0].token_ids == alone
    greedy = LLM(smollm, kv_budget="32MiB").generate(prompt, SamplingParams(temperature=0, max_tokens=10,
                                                                            ignore_eos=True))
    top1 = LLM(smollm, kv_budget="32MiB").generate(prompt, SamplingParams(top_k=1, max_tokens=10,
                                                                          ignore_eos=True))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_stop_strings_stop_tokens_and_logprobs(smollm):
    llm = LLM(smollm, kv_budget="32MiB")
    prompt = chat_ids(smollm, "Name three colors.")
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, logprobs=3))[0].outputs[0]
    assert full.text == "1. Red\n2. Blue\n3. Green"
    for entry, token in zip(full.logprobs, full.token_ids, strict=True):
        assert len(entry) >= 3 and token in entry
        assert entry[token] == max(entry.values()) <= 0.0
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop=["Blue"]))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("1. Red\n2. ", "stop", "Blue")
    stop_token = full.token_ids[3]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30,
                                              stop_token_ids=[stop_token]))[0].outputs[0]
    assert out.token_ids == full.token_ids[:4] and out.stop_reason == stop_token
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert out.token_ids == full.token_ids[:3] and out.finish_reason == "length"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "n must be at least 1"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
])
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused(smollm):
    engine = LLMEngine(smollm, kv_budget="8MiB", max_model_len=256)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="exceeds the model's context length of 256"):
        engine.add_request([100] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request([10**6], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_async_streams_and_abort_frees_blocks(smollm):
    async def main():
        llm = AsyncLLM(LLMEngine(smollm, kv_budget="32MiB"))
        try:
            texts = []
            async for out in llm.generate(chat_ids(smollm, "Name three colors."),
                                          SamplingParams(temperature=0, max_tokens=30)):
                texts.append(out.outputs[0].text)
            assert texts[-1] == "1. Red\n2. Blue\n3. Green"
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
            stream = llm.generate([100] * 64, SamplingParams(max_tokens=500, ignore_eos=True), "victim")
            async for out in stream:
                if len(out.outputs[0].token_ids) >= 2:
                    break
            await stream.aclose()
            engine = llm.engine
            assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
            assert "victim" not in engine.requests
            with pytest.raises(InvalidRequestError, match="prompt is empty"):
                async for _ in llm.generate([], SamplingParams()):
                    pass
        finally:
            llm.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_paused_request_gives_up_its_blocks_first_and_resumes_exactly(smollm, mode):
    """A paused request (the agent scheduler's preemption) keeps its blocks until others need
    them; then they are swapped or dropped before any running request is preempted."""
    a, b = random_prompts(2, 60, 60, seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = LLM(smollm, kv_budget="64MiB").generate([a], params)[0].outputs[0].token_ids
    block_bytes = smollm.config.kv_bytes_per_token * 16 * 4
    engine = LLMEngine(smollm, kv_budget=8 * block_bytes, preemption_mode=mode)  # 128 tokens: one at a time
    engine.add_request(a, params, "a")
    for _ in range(5):
        engine.step()
    engine.pause_request("a")
    held = engine.blocks.num_used_blocks
    assert held == 4 and engine.scheduler.paused[0].status.value == "running"  # 64 tokens
    assert engine.step() == [] and engine.blocks.num_used_blocks == held  # kept while nobody needs them
    engine.add_request(b, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), "b")
    done = {}
    while "b" not in done:
        done |= {o.request_id: o for o in engine.step() if o.finished}
    stats = engine.scheduler.stats
    assert stats.preemptions == 0  # nobody running was preempted: the paused request paid
    assert (stats.swap_outs, stats.recomputes) == ((1, 0) if mode == "swap" else (0, 1))
    engine.resume_request("a")
    while "a" not in done:
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert done["a"].outputs[0].token_ids == reference
    assert engine.blocks.num_used_blocks == 0


def test_kv_capacity_caps_blocks_at_run_time(smollm):
    engine = LLMEngine(smollm, kv_budget="8MiB")
    total = engine.blocks.num_blocks
    assert engine.set_kv_capacity(4) == total and engine.stats()["kv_blocks_capacity"] == 4
    engine.add_request(random_prompts(1, 100, 100)[0], SamplingParams(max_tokens=4), "x")
    assert engine.step() == [] and engine.blocks.num_used_blocks <= 4  # waits: 100 tokens need 7 blocks
    engine.set_kv_capacity(total)
    assert engine.step()[0].request_id == "x"
    with pytest.raises(InvalidRequestError, match=f"KV capacity must be between 1 and {total} blocks"):
        engine.set_kv_capacity(0)


def test_the_engine_thread_outlives_a_caller_whose_event_loop_closed(smollm):
    """A command whose caller gave up (its loop closed before the answer) must not kill the engine."""
    import time

    llm = AsyncLLM(LLMEngine(smollm, kv_budget="16MiB"))

    async def give_up() -> None:
        task = asyncio.ensure_future(llm.call(lambda: time.sleep(0.3)))
        await asyncio.sleep(0.05)
        task.cancel()

    try:
        asyncio.run(give_up())  # the loop closes while the engine thread still runs the command
        time.sleep(0.5)
        assert not llm.is_dead
        assert asyncio.run(llm.stats())["num_running"] == 0
    finally:
        llm.shutdown()
