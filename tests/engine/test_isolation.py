"""One request never fails another: a sequence that breaks inside a step fails alone, and the
others produce exactly the tokens they produce alone. Plus the sampler's parameters, exactly."""

import asyncio
import math

import pytest
import torch

from llmos.engine import LLM, AsyncLLM, InvalidRequestError, LLMEngine, SamplingParams
from llmos.engine.engine import RequestFailedError
from llmos.engine.sampler import _penalise, sample
from llmos.engine.sequence import Sequence

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = {"a": "The capital of France is", "b": "One, two, three,"}


class ExplodingGrammar:
    """A grammar whose matcher fails when asked for its mask (a bug in a grammar engine, say)."""

    def compute_bitmask(self):
        raise RuntimeError("grammar engine crashed")


@pytest.fixture(scope="module")
def reference(smollm) -> dict[str, list[int]]:
    """Each prompt's tokens when it runs alone."""
    llm = LLM(smollm, kv_budget="32MiB")
    return {k: llm.generate(p, PARAMS)[0].outputs[0].token_ids for k, p in PROMPTS.items()}


def run(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return done


@pytest.mark.parametrize("poison", ["sampling", "model input"])
def test_a_poisoned_sequence_fails_alone(smollm, reference, poison):
    engine = LLMEngine(smollm, kv_budget="32MiB")
    for k, p in PROMPTS.items():
        engine.add_request(p, PARAMS, k)
    engine.add_request("Poisoned", PARAMS, "p")
    victim = engine.requests["p"].seqs[0]
    if poison == "sampling":
        victim.matcher = ExplodingGrammar()
    else:  # a token the model's embedding cannot look up: the batched forward pass raises
        victim.token_ids[-1] = smollm.config.vocab_size + 10
    done = run(engine)
    assert done["p"].finish_reason == "error"
    assert ("grammar engine crashed" in done["p"].stop_reason) == (poison == "sampling")
    for k in PROMPTS:
        assert done[k].token_ids == reference[k] and done[k].finish_reason == "length"
    assert engine.blocks.num_used_blocks == 0


def test_async_failure_reaches_only_its_caller(smollm, reference):

    async def main():
        llm = AsyncLLM(LLMEngine(smollm, kv_budget="32MiB"))

        async def last(prompt, rid):
            final = None
            async for out in llm.generate(prompt, PARAMS, rid):
                final = out
            return final

        def poison() -> None:
            llm.engine.requests["p"].seqs[0].matcher = ExplodingGrammar()

        try:
            await llm.call(lambda: None)
            tasks = {k: asyncio.ensure_future(last(p, k)) for k, p in PROMPTS.items()}
            victim = llm.generate("Poisoned", PARAMS, "p", on_added=lambda _: poison())
            with pytest.raises(RequestFailedError, match="grammar engine crashed"):
                async for _ in victim:
                    pass
            outs = {k: (await t).outputs[0].token_ids for k, t in tasks.items()}
            assert outs == reference and not llm.is_dead
        finally:
            llm.shutdown()

    asyncio.run(main())


def test_tiny_temperature_is_greedy_and_non_finite_values_are_refused(smollm, reference):
    llm = LLM(smollm, kv_budget="32MiB")
    tiny = SamplingParams(temperature=1e-45, max_tokens=10, ignore_eos=True)
    assert llm.generate(PROMPTS["a"], tiny)[0].outputs[0].token_ids == reference["a"]
    fields = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
    for field in fields:
        for value in (math.inf, -math.inf, math.nan):
            with pytest.raises(InvalidRequestError, match=f"{field} must be a finite number"):
                SamplingParams(**{field: value})
    with pytest.raises(InvalidRequestError, match="finite"):
        SamplingParams(logit_bias={5: math.inf})


def fake_seq(prompt: list[int], output: list[int], **params) -> Sequence:
    return Sequence("r", 0, prompt + output, len(prompt), SamplingParams(**params))


def test_penalties_follow_vllm_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]] * 2)
    plain = fake_seq([0], [4], temperature=0)
    seq = fake_seq([1], [2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    _penalise(logits, [plain, seq])
    assert logits[0].tolist() == [2.0, -2.0, 1.0, 0.5, 3.0]  # a row without penalties is untouched
    # token 1 (prompt only): -2 * 2; token 2 (twice): 1 / 2 - 0.25 * 2 - 0.5;
    # token 3 (once): 0.5 / 2 - 0.25 - 0.5
    assert logits[1].tolist() == [2.0, -4.0, -0.5, -0.5, 3.0]


def test_logit_bias_and_min_p():
    logits = torch.tensor([[5.0, 0.0, 4.9, -1.0]])
    biased = fake_seq([0], [], temperature=0, logit_bias={3: 100.0})
    assert sample(logits.clone(), [biased])[0] == [3]
    # min_p 0.5 keeps the tokens at least half as likely as the best (0 and 2): never 1 or 3
    seen = set()
    for seed in range(40):
        seq = fake_seq([0], [], temperature=1.0, min_p=0.5)
        seq.generator = torch.Generator().manual_seed(seed)
        seen.add(sample(logits.clone(), [seq])[0][0])
    assert seen == {0, 2}
    crowded = fake_seq([0], [], temperature=1.0, logit_bias={0: -100.0, 1: -100.0, 2: -100.0, 3: -100.0})
    crowded.generator = torch.Generator().manual_seed(0)
    impossible = torch.tensor([[-math.inf] * 4])
    assert sample(impossible, [crowded])[2].keys() == {0}  # a row that cannot sample fails, alone
