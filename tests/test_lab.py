"""`llmos lab`: each lab at its small size, asserting the numbers its JSON holds (and its PNG drawn)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.lab import run_lab
from llmos.lab._common import load

LLMOS = str(Path(sys.executable).with_name("llmos"))


@pytest.fixture(scope="module")
def model():
    return load()


def _png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    return struct.unpack(">II", data[16:24])


def _check_files(result) -> dict:
    assert json.loads(result.json_path.read_text()) == result.data
    width, height = _png(result.png_path)
    assert width >= 800 and height >= 400
    return result.data


def test_paging_removes_the_three_kinds_of_waste(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = run_lab("paging", None, "small", model=model)
    assert result.json_path == tmp_path / "home" / "lab" / "paging.json"  # the home, never the cwd
    d = _check_files(result)
    s = d["schemes"]
    maxlen, exact, paged = s["max-length reservation"], s["exact reservation"], s["paged"]
    assert paged["waste"] < 0.04
    assert paged["waste"] < exact["waste"] and paged["waste"] < maxlen["waste"]
    assert paged["shares"]["reservation"] == paged["shares"]["external"] == 0
    assert exact["shares"]["internal"] == pytest.approx(0, abs=1e-12)  # exact: nothing reserved unused
    assert maxlen["shares"]["internal"] > 0.2  # max-length: most of the reservation is never filled
    assert exact["shares"]["external"] > 0  # contiguous regions leave holes
    assert paged["max_running"] >= exact["max_running"] > maxlen["max_running"] >= 1
    for r in s.values():
        assert 0 < sum(r["shares"].values()) <= 1
    assert d["engine"]["kv_waste"] < 0.04  # the real engine's own measurement agrees
    assert len(d["requests"]) == 8 and all(r["output_tokens"] >= 1 for r in d["requests"])
    assert "paged" in result.summary and "waste" in result.summary


def test_sharing_copy_on_write_and_the_prefix_cache_hold_fewer_blocks(model, tmp_path):
    d = _check_files(run_lab("sharing", tmp_path, "small", model=model))
    a, b = d["samples"], d["system_prompt"]
    full_prompt_blocks = a["prompt_tokens"] // 16
    assert a["peak_blocks_copy_on_write"] < a["peak_blocks_without_sharing"]
    assert a["peak_blocks_without_sharing"] <= a["n"] * -(-(a["prompt_tokens"] + a["max_tokens"]) // 16)
    assert a["peak_shared_blocks"] >= full_prompt_blocks  # every full prompt block is shared by all samples
    assert a["distinct_samples"] >= 2  # they are different samples, not copies
    assert b["peak_blocks_prefix_cache"] < b["peak_blocks_no_cache"]
    assert b["prompt_tokens_computed_no_cache"] == b["prompt_tokens"]
    shared = (b["k"] - 1) * 16 * (b["system_prompt_tokens"] // 16)  # the system prompt's full blocks
    assert b["prompt_tokens_computed_prefix_cache"] <= b["prompt_tokens"] - shared
    assert b["outputs_identical"] is True


def test_switch_resumes_with_identical_tokens_whether_kv_is_kept_swapped_or_recomputed(model, tmp_path):
    d = _check_files(run_lab("switch", tmp_path, "small", model=model))
    m = d["modes"]
    modes = ("kept", "swapped", "recomputed")
    assert {k: r["tokens_identical"] for k, r in m.items()} == dict.fromkeys(modes, True)
    assert [m[k]["status_while_suspended"] for k in modes] == [
        "kept", "swapped", "dropped"]
    blocks = -(-(d["prompt_tokens"] + d["suspended_after"] - 1) // 16)  # KV of the tokens so far
    assert m["kept"]["device_blocks_held"] == m["swapped"]["host_blocks_held"] == blocks
    assert m["swapped"]["device_blocks_held"] == m["recomputed"]["device_blocks_held"] == 0
    assert m["kept"]["bytes_moved"] == m["recomputed"]["bytes_moved"] == 0 < m["swapped"]["bytes_moved"]
    assert m["recomputed"]["tokens_recomputed"] >= d["prompt_tokens"] + d["suspended_after"] - 1
    assert m["kept"]["tokens_recomputed"] == m["swapped"]["tokens_recomputed"] == 0
    assert d["generated_tokens"] > d["suspended_after"]


def test_lab_command_rejects_an_unknown_lab_and_writes_nothing(tmp_path):
    r = subprocess.run([LLMOS, "lab", "pagin"], capture_output=True, text=True, cwd=tmp_path,
                       env={"LLMOS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert ("no lab named 'pagin'; the labs are paging, sharing, switch, sched, context, inject"
            in " ".join(r.stderr.split()))
    assert list(tmp_path.iterdir()) == []
