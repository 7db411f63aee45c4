"""Bench workloads are fixed and bounded; the HF peer holds exactly llmos' weights."""

from __future__ import annotations

import pytest
import torch

from llmos.bench.workloads import (
    BenchRequest,
    describe,
    qwen3_0_6b_config,
    requested_output_tokens,
    static_reservation_tokens,
    workload_c,
    workload_g,
    workload_shared_prefix,
)
from llmos.models.config import ModelConfig
from llmos.models.llama import LlamaForCausalLM


def check_bounds(reqs, prompt_len, max_tokens, token_range):
    assert all(prompt_len[0] <= len(r.prompt_token_ids) <= prompt_len[1] for r in reqs)
    assert all(max_tokens[0] <= r.max_tokens <= max_tokens[1] for r in reqs)
    ids = [t for r in reqs for t in r.prompt_token_ids]
    assert token_range[0] <= min(ids) and max(ids) <= token_range[1]
    assert all(isinstance(t, int) for t in ids[:50])


def test_workload_c_size_bounds_and_determinism():
    reqs = workload_c()
    assert len(reqs) == 64
    check_bounds(reqs, (32, 512), (16, 256), (100, 9999))
    assert reqs == workload_c()
    quick = workload_c(quick=True)
    assert len(quick) == 32
    check_bounds(quick, (32, 256), (16, 128), (100, 9999))


def test_workload_g_is_nano_vllm_bench():
    reqs = workload_g()
    assert len(reqs) == 256
    check_bounds(reqs, (100, 1024), (100, 1024), (0, 10000))
    assert reqs == workload_g()
    assert workload_g(quick=True) == reqs[:32]


def test_shared_prefix():
    reqs = workload_shared_prefix(n=8, prefix_len=256, suffix_len=(16, 64), max_tokens=16)
    assert len(reqs) == 8
    prefix = reqs[0].prompt_token_ids[:256]
    assert all(r.prompt_token_ids[:256] == prefix and r.max_tokens == 16 for r in reqs)
    assert all(16 <= len(r.prompt_token_ids) - 256 <= 64 for r in reqs)
    assert len({tuple(r.prompt_token_ids) for r in reqs}) == 8


def test_token_accounting():
    reqs = [BenchRequest([1, 2, 3], 4), BenchRequest([5], 2)]
    assert requested_output_tokens(reqs) == 6
    assert static_reservation_tokens(reqs) == 10
    assert describe(reqs)["max_sequence_len"] == 7
    with pytest.raises(ValueError):
        BenchRequest([], 3)
    with pytest.raises(ValueError):
        BenchRequest([1], 0)


def test_qwen3_config_shape():
    cfg = qwen3_0_6b_config()
    assert (cfg.arch, cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == ("qwen3", 151936, 1024, 28)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qk_norm) == (16, 8, 128, True)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6


# ---------------------------------------------------------------------------------------------- peers

transformers = pytest.importorskip("transformers")
from llmos.bench.engine import _sweep_sizes  # noqa: E402
from llmos.bench.peers import (  # noqa: E402
    PeerResult,
    PeerSkipped,
    build_hf_model,
    fastest,
    plan_batches,
    random_state_dict,
    run_hf_continuous_batching,
    run_hf_generate,
    sweep,
)


def tiny_config(arch: str) -> ModelConfig:
    return ModelConfig(
        arch=arch, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=50000.0, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=arch != "llama",
        attention_bias=arch == "qwen2", qk_norm=arch == "qwen3", eos_token_ids=(2,),
    )


def perturbed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random norms and biases too, so a weight loaded in the wrong place shows."""
    gen = torch.Generator().manual_seed(1)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) if ("norm" in k or "bias" in k) else 5 * v
        for k, v in sd.items()
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_model_equals_llmos(arch):
    cfg = tiny_config(arch)
    sd = perturbed(random_state_dict(cfg, torch.float32, seed=0))
    ours = LlamaForCausalLM(cfg)
    ours.load_hf_state_dict(sd)
    hf = build_hf_model(cfg, sd, torch.float32)
    assert not hf.training
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ours.compute_logits(ours(ids, torch.arange(len(ids))))
        got = hf(ids[None]).logits[0].float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_random_state_dict_scale_and_seed():
    cfg = tiny_config("qwen3")
    sd = random_state_dict(cfg, torch.bfloat16, seed=3)
    assert "lm_head.weight" not in sd and sd["embed_tokens.weight"].dtype == torch.bfloat16
    assert abs(sd["layers.0.mlp.up_proj.weight"].float().std().item() - 0.02) < 0.002
    assert torch.equal(sd["layers.1.self_attn.q_norm.weight"], torch.ones(16, dtype=torch.bfloat16))
    again = random_state_dict(cfg, torch.bfloat16, seed=3)
    assert torch.equal(sd["embed_tokens.weight"], again["embed_tokens.weight"])


def test_hf_generate_counts_requested_tokens_only():
    cfg = tiny_config("llama")
    hf = build_hf_model(cfg, random_state_dict(cfg, torch.float32))
    reqs = [BenchRequest([5, 6, 7], 4), BenchRequest(list(range(10, 30)), 7), BenchRequest([9] * 5, 2)]
    advanced = []
    result = run_hf_generate(hf, reqs, batch_size=2, progress=advanced.append, order="arrival")
    assert result.requested_output_tokens == 13 == sum(advanced)
    assert [len(o) for o in result.outputs] == [4, 7, 2]
    assert result.throughput == pytest.approx(13 / result.wall_s)
    assert result.extra["generated_tokens"] == 2 * 7 + 1 * 2
    assert result.extra["decode_steps"] == 6 + 1
    # greedy and padding-independent: a request alone gives the same tokens
    alone = run_hf_generate(hf, reqs[:1], warmup=False)
    assert alone.outputs[0] == result.outputs[0]
    assert not PeerSkipped("x", "why")


def sized(prompt_len: int, max_tokens: int) -> BenchRequest:
    return BenchRequest(list(range(3, 3 + prompt_len)), max_tokens)


def test_sorted_batches_group_by_max_tokens_then_prompt_length():
    reqs = [sized(30, 8), sized(5, 2), sized(12, 8), sized(40, 2), sized(7, 5), sized(12, 8), sized(9, 5)]
    assert plan_batches(reqs, 3, "arrival") == [[0, 1, 2], [3, 4, 5], [6]]
    # max_tokens 2, 2, 5, 5, 8, 8, 8; among equals the shorter prompt, then the earlier request
    assert plan_batches(reqs, 3) == [[1, 3, 4], [6, 2, 5], [0]]
    assert plan_batches(reqs, 2) == [[1, 3], [4, 6], [2, 5], [0]]
    assert plan_batches(reqs, 10) == [[1, 3, 4, 6, 2, 5, 0]]
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(reqs, 0)
    with pytest.raises(ValueError, match="unknown batch order 'random'"):
        plan_batches(reqs, 2, "random")


def test_sorted_batches_cut_unrequested_tokens_on_workload_c():
    reqs = workload_c()

    def waste(batches):
        generated = sum(max(reqs[i].max_tokens for i in b) * len(b) for b in batches)
        return 1 - requested_output_tokens(reqs) / generated

    assert round(waste(plan_batches(reqs, 16, "arrival")), 2) == 0.46  # the untuned figure
    assert waste(plan_batches(reqs, 16)) < 0.2


def test_sorted_generate_returns_outputs_in_request_order_and_counts_its_own_batches():
    cfg = tiny_config("llama")
    hf = build_hf_model(cfg, random_state_dict(cfg, torch.float32))
    reqs = [BenchRequest([5, 6, 7], 4), BenchRequest(list(range(10, 30)), 7), BenchRequest([9] * 5, 2)]
    arrival = run_hf_generate(hf, reqs, batch_size=2, order="arrival")
    ordered = run_hf_generate(hf, reqs, batch_size=2, warmup=False)
    assert ordered.extra["order"] == "sorted" and ordered.extra["batches"] == 2
    assert ordered.outputs == arrival.outputs and [len(o) for o in ordered.outputs] == [4, 7, 2]
    # batches [2, 0] (4 new tokens each) and [1] (7): 15 generated, 3 + 6 decode steps
    assert ordered.extra["generated_tokens"] == 15 < arrival.extra["generated_tokens"] == 16
    assert ordered.extra["decode_steps"] == 9
    assert ordered.extra["unrequested_output_ratio"] == pytest.approx(2 / 15)


def ran(name: str, throughput: float) -> PeerResult:
    return PeerResult(name, 100, 100 / throughput, throughput)


def test_sweep_stops_after_the_first_slower_setting_and_picks_the_fastest():
    speeds = {4: 10.0, 8: 14.0, 16: 12.0, 32: 20.0}
    tried = []

    def run(size):
        tried.append(size)
        return ran(f"b{size}", speeds[size])

    rows = sweep(run, [4, 8, 16, 32])
    assert tried == [4, 8, 16] and fastest(rows).name == "b8"
    tried.clear()
    rows = sweep(lambda b: PeerSkipped("x", "no") if b == 8 else run(b), [4, 8, 16])
    assert tried == [4] and len(rows) == 2 and fastest(rows).name == "b4"
    assert fastest([PeerSkipped("x", "no")]) is None
    assert fastest([ran("a", 3.0), ran("b", 3.0)]).name == "a"


def test_sweep_sizes_stop_at_the_whole_workload():
    assert _sweep_sizes((4, 8, 16, 32, 64), workload_c()) == [4, 8, 16, 32, 64]
    assert _sweep_sizes((4, 8, 16, 32, 64), workload_c(quick=True)) == [4, 8, 16, 32]
    assert _sweep_sizes((64, 4, 128), [sized(3, 2)] * 10) == [4, 10]
    assert _sweep_sizes((2, 4), [sized(3, 2)] * 10) == [2, 4]


def test_continuous_batching_caps_requests_per_forward_and_matches_generate():
    cfg = tiny_config("llama")
    hf = build_hf_model(cfg, random_state_dict(cfg, torch.float32))
    reqs = [BenchRequest([5, 6, 7], 4), BenchRequest(list(range(10, 30)), 7), BenchRequest([9] * 5, 2)]
    result = run_hf_continuous_batching(hf, reqs, max_requests_per_batch=2, page_size=16, timeout_s=60)
    if not result:
        pytest.skip(result.reason)
    assert result.extra["max_requests_per_batch"] == 2 and result.extra["short_outputs"] == 0
    assert result.outputs == run_hf_generate(hf, reqs, batch_size=3, warmup=False).outputs
