"""The dequantized-weight cache: a hit gives exactly the weights a fresh dequantization gives,
a changed or damaged file is never served, and a cache that cannot be written costs nothing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from reference_models import byte_level_vocab, hf_logits, mixed_quant, our_logits, tiny_hf_model, write_gguf

from llmos import home
from llmos.models.cache import weight_cache_path
from llmos.models.llama import fuse_hf_weights
from llmos.models.loader import LoadedModel, load_model, read_gguf

VOCAB = len(byte_level_vocab()[0])
IDS = list(range(3, 120, 2))


def _params(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(loaded.model.named_parameters())


def test_cache_lives_under_llmos_home(llmos_home: Path, smollm_path: Path) -> None:
    assert home.llmos_home() == llmos_home
    assert weight_cache_path(smollm_path).parent == llmos_home / "cache"


def test_embedded_model_cache_equals_fresh_dequantization(smollm: LoadedModel, smollm_path: Path) -> None:
    entry = weight_cache_path(smollm_path)
    assert entry.is_file()  # written by the session's first (cold) load
    config, weights, _ = read_gguf(smollm_path)
    fresh = fuse_hf_weights(config, weights)
    params = _params(smollm)
    assert set(params) == set(fresh)
    for name, tensor in fresh.items():
        assert torch.equal(params[name], tensor), name


def test_warm_load_reads_the_entry_without_rewriting(tmp_path: Path) -> None:
    path = write_gguf(tiny_hf_model("llama", VOCAB), tmp_path / "m.gguf", qtype=mixed_quant)
    entry = weight_cache_path(path)
    assert not entry.exists()
    cold = load_model(path)
    stamp = entry.stat().st_mtime_ns
    warm = load_model(path)
    assert entry.stat().st_mtime_ns == stamp
    for name, tensor in _params(cold).items():
        assert torch.equal(_params(warm)[name], tensor), name
    assert not [p for p in entry.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_changed_gguf_is_not_served_from_cache(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_gguf(tiny_hf_model("qwen3", VOCAB, seed=1), path)
    old_entry = weight_cache_path(path)
    load_model(path)
    new_model = tiny_hf_model("qwen3", VOCAB, seed=2)
    write_gguf(new_model, path)  # same size, new contents
    assert weight_cache_path(path) != old_entry
    diff = (our_logits(load_model(path), IDS) - hf_logits(new_model, IDS)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_entry_is_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    hf = tiny_hf_model("qwen2", VOCAB)
    path = write_gguf(hf, tmp_path / "m.gguf")
    load_model(path)
    entry = weight_cache_path(path)
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="llmos.models.cache"):
        loaded = load_model(path)
    assert "discarding unreadable weight cache" in caplog.text
    assert (our_logits(loaded, IDS) - hf_logits(hf, IDS)).abs().max().item() < 1e-4
    assert entry.read_bytes() == data  # rewritten whole


def test_unwritable_cache_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where LLMOS_HOME should be a directory")
    monkeypatch.setenv("LLMOS_HOME", str(blocker))
    hf = tiny_hf_model("llama", VOCAB)
    path = write_gguf(hf, tmp_path / "m.gguf")
    with caplog.at_level(logging.WARNING, logger="llmos.models.cache"):
        loaded = load_model(path)
    assert "cannot write weight cache" in caplog.text
    assert (our_logits(loaded, IDS) - hf_logits(hf, IDS)).abs().max().item() < 1e-4


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_warm_load_maps_the_entry_instead_of_copying(smollm: LoadedModel, smollm_path: Path) -> None:
    """A warm fp32 load adopts the memory-mapped tensors as parameters: no second copy."""
    loaded = load_model(smollm_path)
    entry = weight_cache_path(smollm_path)
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(entry) in line]
    assert maps, "the cache entry is not memory-mapped"
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    for name, param in _params(loaded).items():
        ptr = param.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} was copied out of the map"
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
