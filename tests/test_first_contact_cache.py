"""`llmos cache`: the weight cache and scratch directories are listed and cleared, a live agent's kept."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from llmos.kernel import Kernel
from tests.stub_backend import StubBackend

LLMOS = str(Path(sys.executable).with_name("llmos"))


def llmos(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLMOS, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LLMOS_HOME": str(home), "COLUMNS": "200"})


def test_cache_lists_and_clears_but_keeps_a_live_agents_scratch(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "model-0123.safetensors").write_bytes(b"w" * 3000)

    async def sleeper(sys):
        (sys.workdir / "notes.txt").write_text("mine")
        await sys.sleep(120)

    async def finished(sys):
        (sys.workdir / "old.txt").write_text("x" * 500)

    async def go():
        kernel = Kernel(StubBackend(), home=tmp_path)
        try:
            done = await kernel.spawn(finished, "finished")
            await kernel.wait(done)
            live = await kernel.spawn(sleeper, "sleeper")
            while not (tmp_path / "scratch" / str(live) / "notes.txt").exists():
                await asyncio.sleep(0.05)
            listed = await asyncio.to_thread(llmos, tmp_path, "cache")
            cleared = await asyncio.to_thread(llmos, tmp_path, "cache", "clear")
            return done, live, listed, cleared
        finally:
            await kernel.shutdown()

    done, live, listed, cleared = asyncio.run(go())
    assert listed.returncode == 0
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in listed.stdout.splitlines()
            if line.startswith("│")]
    assert rows == [["weights", str(tmp_path / "cache"), "1", "3.0 KB"],
                    ["scratch", str(tmp_path / "scratch"), "2", "504 B"]]
    assert cleared.returncode == 0
    assert cleared.stdout.splitlines() == ["weights: removed 1 entries, 3.0 KB freed",
                                           "scratch: removed 1 entries, 500 B freed, kept 1 of live agents"]
    assert not (tmp_path / "cache" / "model-0123.safetensors").exists()
    assert not (tmp_path / "scratch" / str(done)).exists()
    assert (tmp_path / "scratch" / str(live) / "notes.txt").read_text() == "mine"


def test_cache_clear_names_an_unknown_kind(tmp_path):
    r = llmos(tmp_path, "cache", "clear", "models")
    assert (r.returncode, r.stderr.strip()) == (2, "error: unknown cache 'models'; choose one of weights, "
                                                   "scratch")


def test_bench_results_go_to_the_llmos_home_unless_a_path_is_named(tmp_path, monkeypatch):
    from rich.console import Console

    from llmos.bench.engine import write_report

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("LLMOS_HOME", str(home))
    monkeypatch.chdir(cwd)
    console = Console(record=True, width=200)
    write_report({"n": 1}, None, "docs/bench/security.json", console)
    write_report({"n": 2}, None, "bench-results/prefix.json", console)
    write_report({"n": 3}, str(tmp_path / "mine.json"), "bench-results/prefix.json", console)
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in (home / "bench-results").iterdir()) == ["prefix.json", "security.json"]
    assert (tmp_path / "mine.json").read_text() == '{\n  "n": 3\n}'
    assert f"results written to {home / 'bench-results' / 'security.json'}" in console.export_text()
