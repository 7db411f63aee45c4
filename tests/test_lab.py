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


def test_lab_command_rejects_an_unknown_lab_and_writes_nothing(tmp_path):
    r = subprocess.run([LLMOS, "lab", "pagin"], capture_output=True, text=True, cwd=tmp_path,
                       env={"LLMOS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "no lab named 'pagin'; the labs are paging, sharing, switch" in r.stderr
    assert list(tmp_path.iterdir()) == []
