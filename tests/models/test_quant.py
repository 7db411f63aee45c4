"""Quantized weights: the C kernels against dequantize-then-matmul references, the GGUF loader.

The reference for every format is gguf.quants' own dequantization of the same
blocks. The kernel quantizes the activations (15 bits per block of 32), so the
reference multiplies them as quantized, and the kernel must equal it up to
float rounding; against the unquantized activations the error is that of the
15-bit activations alone, bounded separately. The kernel layout is checked to
be an exact rearrangement of the file's blocks, and the portable C path to give
the AVX-512 path's bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos.models import quant
from llmos.models.config import ModelError
from llmos.models.loader import load_model
from llmos.models.quant import QuantFormat, QuantizedEmbedding, QuantizedLinear

pytestmark = pytest.mark.skipif(not quant.available(), reason="the C kernel needs a compiler")

# (rows of x, output features, input features): single rows, odd counts, one block, many blocks,
# partial groups of 16 weight rows and partial tiles of 8 activation rows.
SHAPES = [(1, 1, 32), (1, 7, 64), (3, 33, 96), (6, 5, 160), (17, 5, 160), (64, 130, 576), (13, 16, 64)]
FORMATS = ["Q4_0", "Q4_1", "Q8_0", "int8"]


def _quantized(fmt: str, w: torch.Tensor) -> quant.QuantWeight:
    if fmt == "int8":
        return quant.quantize_int8_per_channel(w)
    return quant.quantize(w, QuantFormat[fmt])


def _activations_as_quantized(x: torch.Tensor) -> torch.Tensor:
    q, d, _ = quant.quantize_activations(x)
    m, k = x.shape
    return (q.float().view(m, k // 32, 32) * d[..., None]).view(m, k)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_dequantize_then_matmul(fmt, shape):
    m, n, k = shape
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w = torch.randn(n, k, generator=gen)
    w[0, :5] *= 20  # an outlier row segment, as real checkpoints have
    x = torch.randn(m, k, generator=gen) * 3
    qw = _quantized(fmt, w)
    dense = x @ qw.dequantize().T
    reference = _activations_as_quantized(x) @ qw.dequantize().T
    out = quant.quant_linear(x, qw)
    assert out.shape == (m, n) and out.dtype == torch.float32
    scale = reference.abs().max()
    torch.testing.assert_close(out, reference, atol=2e-5 * scale, rtol=1e-5)
    # Against fp32 activations: only the 15-bit activations' error (under 1e-4 of the largest output).
    assert (out - dense).abs().max() < 1e-4 * scale


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 50])
def test_the_kernel_layout_is_an_exact_rearrangement_of_the_files_blocks(fmt, rows):
    # Random bytes for every value (all 256 patterns of a Q8 byte, both nibbles) and finite scales.
    fmt = QuantFormat[fmt]
    gen = np.random.default_rng(rows)
    blocks = gen.integers(0, 256, size=(rows, 3, fmt.block_bytes), dtype=np.uint8)
    scales = gen.standard_normal((rows, 3, 2)).astype(np.float16).view(np.uint8)
    blocks[..., :4] = scales.reshape(rows, 3, 4)
    ggml = quant.GGMLWeight(blocks.reshape(rows, -1), fmt, 96)
    packed = ggml.pack()
    assert packed.shape == (rows, 96) and packed.data.shape == (-(-rows // 16), 3 * fmt.group_block_bytes)
    assert np.array_equal(packed.to_ggml().blocks, ggml.blocks)
    dense = ggml.dequantize()
    torch.testing.assert_close(QuantizedEmbedding(packed)(torch.arange(rows)), dense, atol=1e-6, rtol=1e-6)
    # Every weight is multiplied where it belongs: each unit vector reads one column back.
    out = quant.quant_linear(torch.eye(96), packed)
    torch.testing.assert_close(out, dense.T, atol=1e-6 * dense.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 3e38])
def test_a_non_finite_activation_poisons_only_its_own_row(bad):
    qw = quant.quantize(torch.randn(20, 64), QuantFormat.Q4_1)
    x = torch.randn(3, 64)
    x[1, 40] = bad
    out = quant.quant_linear(x, qw)
    if bad == 3e38:  # huge but finite: quantized like any other block
        assert torch.isfinite(out[1]).any()
    else:  # the row's products are NaN, as in float arithmetic, never a wild integer conversion
        assert torch.isnan(out[1]).all()
    for i in (0, 2):
        assert torch.equal(out[i], quant.quant_linear(x[i : i + 1], qw)[0])


def test_malformed_blocks_are_refused_before_the_kernel_reads_them():
    rows = np.zeros((3, 40), dtype=np.uint8)  # two Q4_1 blocks a row
    with pytest.raises(ModelError, match="multiple of 32"):
        quant.GGMLWeight(rows, QuantFormat.Q4_1, 48).pack()
    with pytest.raises(ModelError, match="expected 60 bytes a row, got 40"):
        quant.GGMLWeight(rows, QuantFormat.Q4_1, 96).pack()  # a row claims more columns than it holds


def test_the_portable_path_gives_the_vectorized_paths_bits():
    import ctypes
    from pathlib import Path

    from llmos.models.cbuild import build_library

    source = Path(quant.__file__).with_name("quant_matmul.c")
    portable = build_library(source, what="portable kernel", defines=("QUANT_PORTABLE",))
    assert portable is not None and portable.quant_vectorized() == 0
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    portable.quant_linear.argtypes = [i, p, i64, i64, p, i64, p, p]
    portable.quant_act_bytes.argtypes = [i64, i64]
    portable.quant_act_bytes.restype = i64
    for fmt in ("Q4_0", "Q4_1", "Q8_0", "int8"):
        x, qw = torch.randn(11, 128) * 4, _quantized(fmt, torch.randn(21, 128))
        out = torch.empty(11, 21)
        scratch = torch.empty(portable.quant_act_bytes(11, 128), dtype=torch.uint8)
        portable.quant_linear(int(qw.fmt), qw.data.data_ptr(), 21, 128, x.data_ptr(), 11, out.data_ptr(),
                              scratch.data_ptr())
        assert torch.equal(out, quant.quant_linear(x, qw)), fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_row_computes_the_same_alone_or_in_a_batch(fmt):
    w, x = torch.randn(37, 96), torch.randn(19, 96)  # two full tiles of 8 rows and a partial one
    qw = _quantized(fmt, w)
    batch = quant.quant_linear(x, qw)
    for i in (0, 5, 8, 16, len(x) - 1):
        assert torch.equal(quant.quant_linear(x[i : i + 1], qw)[0], batch[i])


def test_int8_per_channel_is_exact_per_row():
    w = torch.tensor([[0.5, -1.0] * 16, [0.0] * 32, [3.0, 1.5] * 16])
    deq = quant.quantize_int8_per_channel(w).dequantize()
    scale = (w.abs().amax(1) / 127).half().float()
    torch.testing.assert_close(deq, (w / torch.where(scale > 0, scale, 1)[:, None]).round()
                               .clamp(-127, 127) * scale[:, None], atol=0, rtol=0)
    assert deq[1].abs().max() == 0  # an all-zero row stays zero (no division by zero)
    with pytest.raises(ModelError, match="multiple of 32"):
        quant.quantize_int8_per_channel(torch.ones(2, 40))


def test_activation_quantization_rounds_within_half_a_step():
    x = torch.randn(5, 96) * torch.logspace(-3, 3, 96)
    q, d, s = quant.quantize_activations(x)
    assert q.dtype == torch.int16 and q.abs().max() == 16383  # each block's largest value
    back = _activations_as_quantized(x)
    step = d.repeat_interleave(32, dim=1)
    assert ((back - x).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(s, d * q.view(5, 3, 32).sum(-1).float())
    zero_q, zero_d, _ = quant.quantize_activations(torch.zeros(1, 32))
    assert zero_q.abs().max() == 0 and zero_d.abs().max() == 0


def test_quantized_linear_adds_bias_and_keeps_leading_dims():
    w, b = torch.randn(6, 64), torch.randn(6)
    layer = QuantizedLinear(quant.quantize(w, QuantFormat.Q8_0), b)
    x = torch.randn(2, 3, 64)
    expected = quant.quant_linear(x.reshape(6, 64), layer.qweight).view(2, 3, 6) + b
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="expects 64"):
        quant.quant_linear(torch.randn(1, 32), layer.qweight)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_embedding_rows_equal_dequantized_rows(fmt):
    qw = quant.quantize(torch.randn(50, 96), QuantFormat[fmt])
    emb = QuantizedEmbedding(qw)
    ids = torch.tensor([[3, 49], [0, 3]])
    torch.testing.assert_close(emb(ids), qw.dequantize()[ids], atol=1e-6, rtol=1e-6)
    for bad in (50, -1):
        with pytest.raises(IndexError, match="out of range"):
            emb(torch.tensor([bad]))


def test_mixed_formats_concatenate_dequantized():
    a = quant.quantize(torch.randn(4, 64), QuantFormat.Q4_1).to_ggml()
    b = quant.quantize(torch.randn(2, 64), QuantFormat.Q4_1).to_ggml()
    packed = quant.cat_weights([a, b])
    assert isinstance(packed, quant.GGMLWeight) and packed.fmt is QuantFormat.Q4_1
    torch.testing.assert_close(packed.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = quant.cat_weights([a, quant.quantize(torch.randn(2, 64), QuantFormat.Q8_0).to_ggml()])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (6, 64)


@pytest.fixture(scope="module")
def quantized_smollm():
    return load_model("smollm2-135m-instruct", quantization="gguf")


def test_gguf_weights_stay_packed_and_equal_the_fp32_load(quantized_smollm, smollm):
    model = quantized_smollm.model
    layer = model.layers[3]
    assert {type(getattr(layer, n)) for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")} \
        == {QuantizedLinear}
    assert layer.qkv_proj.qweight.fmt is QuantFormat.Q4_1  # the file's own format
    assert isinstance(model.embed_tokens, QuantizedEmbedding) and model.embed_tokens.qweight.fmt is \
        QuantFormat.Q8_0
    assert model.lm_head.qweight is model.embed_tokens.qweight  # tied: one copy of the blocks
    # No fp32 matrix is resident: only norms (1-D) remain float parameters.
    assert all(p.dim() == 1 for p in model.parameters())
    packed = sum(m.qweight.data.numel() for m in model.modules() if isinstance(m, QuantizedLinear)
                 and m is not model.lm_head)
    assert packed < 100 * 2**20  # ~90 MB packed, against ~540 MB in fp32
    # Fused, RoPE-unpermuted blocks dequantize to exactly the fp32 loader's weights.
    for name in ("qkv_proj", "gate_up_proj", "down_proj"):
        torch.testing.assert_close(getattr(layer, name).qweight.dequantize(),
                                   getattr(smollm.model.layers[3], name).weight, atol=0, rtol=0)


def test_quantized_load_writes_no_weight_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    load_model("smollm2-135m-instruct", quantization="gguf")
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_quantization_choices_are_checked(tmp_path):
    with pytest.raises(ModelError, match="unknown quantization"):
        load_model("smollm2-135m-instruct", quantization="q3")
    with pytest.raises(ModelError, match="float32 only"):
        load_model("smollm2-135m-instruct", dtype=torch.bfloat16, quantization="gguf")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not GGUF-quantized"):
        load_model(tmp_path, quantization="gguf")


def test_auto_keeps_gguf_formats_on_cpu_and_int8_quantizes(smollm):
    auto = load_model("smollm2-135m-instruct", quantization="auto")
    assert isinstance(auto.model.layers[0].qkv_proj, QuantizedLinear)
    int8 = load_model("smollm2-135m-instruct", quantization="int8")
    qkv = int8.model.layers[0].qkv_proj
    assert isinstance(qkv, QuantizedLinear) and qkv.qweight.fmt is QuantFormat.Q8_0
    # Per-channel int8 of the fp32 weights: within half a step of each row's scale.
    w = smollm.model.layers[0].qkv_proj.weight
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((qkv.qweight.dequantize() - w).abs() <= step * 0.51 + 1e-6).all()


def _layer_inputs(model, rows: int):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, model.config.hidden_size, generator=gen)
    return x, model.rope.tables(torch.arange(7, 7 + rows))


def test_fused_layer_computes_what_the_layer_operations_do(quantized_smollm):
    # The two kernel calls around attention against the same layer's tensor operations.
    model = quantized_smollm.model
    assert all(layer.fused for layer in model.layers)
    layer = model.layers[5]
    x, tables = _layer_inputs(model, 5)
    seen = []

    def attn(index, q, k, v):
        seen.append((q.clone(), k.clone(), v.clone()))
        return q * 0.5  # any function of q, the same in both runs

    with torch.inference_mode():
        fused = layer(x, tables, model.rope, attn)
        layer.fused = False
        try:
            reference = layer(x, tables, model.rope, attn)
        finally:
            layer.fused = True
    for a, b in zip(seen[0], seen[1], strict=True):  # q and k rotated, v as projected
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max(), rtol=1e-5)
    torch.testing.assert_close(fused, reference, atol=1e-4 * reference.abs().max(), rtol=1e-4)


def test_fused_layer_rows_do_not_depend_on_the_batch(quantized_smollm):
    model = quantized_smollm.model
    layer = model.layers[2]
    x, tables = _layer_inputs(model, 19)

    def attn(index, q, k, v):
        return q + v.repeat_interleave(q.shape[1] // v.shape[1], 1)

    with torch.inference_mode():
        batch = layer(x, tables, model.rope, attn)
        for i in (0, 6, 8, len(x) - 1):
            one = layer(x[i : i + 1], (tables[0][i : i + 1], tables[1][i : i + 1]), model.rope, attn)
            assert torch.equal(one[0], batch[i])


def _tiny_quantized(**arch) -> torch.nn.Module:
    from llmos.models.config import ModelConfig
    from llmos.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch.pop("arch"), vocab_size=64, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, **arch)
    model = LlamaForCausalLM(cfg)
    state = {}
    for name, p in model.named_parameters():
        value = torch.randn_like(p) * 0.3 if p.dim() == 1 and "norm" not in name else p.detach().clone()
        if p.dim() == 2 and "proj" in name:
            value = quant.quantize(torch.randn_like(p), QuantFormat.Q8_0)
        state[name] = value
    model.load_weights(state)
    return model


def test_a_qkv_bias_is_fused_and_qk_norm_keeps_the_layer_operations():
    qwen2 = _tiny_quantized(arch="qwen2", attention_bias=True)
    layer = qwen2.layers[1]
    assert layer.fused and layer.qkv_proj.bias is not None and layer.qkv_proj.bias.abs().sum() > 0
    x, tables = torch.randn(3, 64), qwen2.rope.tables(torch.arange(3))

    def attn(index, q, k, v):
        return q * 2 + k.repeat_interleave(2, 1)

    with torch.inference_mode():
        fused = layer(x, tables, qwen2.rope, attn)
        layer.fused = False
        reference = layer(x, tables, qwen2.rope, attn)
    torch.testing.assert_close(fused, reference, atol=1e-4 * reference.abs().max(), rtol=1e-4)
    assert not any(layer.fused for layer in _tiny_quantized(arch="qwen3", qk_norm=True).layers)
