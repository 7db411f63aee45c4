"""The engine on the embedded GGUF's own quantized weights (Q4_1, Q8_0), against fp32.

Stated tolerance: the quantized model's logits are within 0.5% (relative L2,
per position) and 0.05 (absolute) of the fp32 model's on the same dequantized
weights, with the same argmax at every position; greedy generation gives the
same tokens. Measured on the VNNI kernel (15-bit activations): 0.25% and 0.019.
"""

import pytest
import torch

from llmos.engine import LLM, SamplingParams
from llmos.models import quant
from llmos.models.loader import load_model
from tests.engine.test_engine import QUESTIONS, chat_ids, dense_greedy

pytestmark = pytest.mark.skipif(not quant.available(), reason="the C kernel needs a compiler")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread (as tests/models do): on a busy 2-core machine two stall at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quantized():
    return load_model("smollm2-135m-instruct", quantization="gguf")


def test_quantized_logits_match_fp32_within_tolerance(quantized, smollm):
    for question in QUESTIONS:
        ids = torch.tensor(chat_ids(smollm, question))
        pos = torch.arange(len(ids))
        with torch.inference_mode():
            lq = quantized.model.compute_logits(quantized.model(ids, pos))
            lf = smollm.model.compute_logits(smollm.model(ids, pos))
        rel = (lq - lf).norm(dim=-1) / lf.norm(dim=-1)
        assert rel.max() < 5e-3, f"{question!r}: relative error {rel.max():.4f}"
        assert (lq - lf).abs().max() < 0.05
        assert torch.equal(lq.argmax(-1), lf.argmax(-1))


def test_quantized_engine_batched_greedy_equals_dense_reference(quantized):
    # Row results of the kernel do not depend on the batch: chunked prefill beside decodes,
    # paged over many blocks, gives exactly the dense recomputation's tokens.
    llm = LLM(quantized, kv_budget="64MiB", block_size=4, max_num_batched_tokens=24)
    prompts = [chat_ids(quantized, q) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == dense_greedy(quantized, prompt, 8)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_engine_defaults_to_the_gguf_format_and_answers_as_fp32_does(smollm):
    llm = LLM("smollm2-135m-instruct", kv_budget="32MiB")
    assert llm.engine.config.weight_quantization == "auto"
    assert isinstance(llm.engine.loaded.model.layers[0].qkv_proj, quant.QuantizedLinear)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [chat_ids(smollm, q) for q in QUESTIONS]
    fp32 = LLM(smollm, kv_budget="32MiB").generate(prompts, params)
    ours = llm.generate(prompts, params)
    for a, b in zip(ours, fp32, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    # An explicit dtype means dequantized weights of that dtype.
    assert LLM(smollm, dtype="float32").engine.config.weight_quantization == "none"
