"""Engine settings that cannot work are ConfigErrors naming the setting, raised before any model
loads; the command line shows one red line for them, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmos.engine import ConfigError, EngineConfig, InvalidRequestError, LLMEngine


@pytest.mark.parametrize(("setting", "message"), [
    ({"block_size": 12}, "block_size must be a power of two, got 12"),
    ({"kv_budget": "lots"}, "cannot read 'lots' as a size (try 512MiB, 2GiB or 0.5)"),
    ({"kv_budget": 1.5}, "kv_budget fraction must be in (0, 1], got 1.5"),
    ({"swap_space": "1 parsec"}, "cannot read '1 parsec' as a size"),
    ({"preemption_mode": "pray"}, "preemption_mode must be recompute, swap or auto, got 'pray'"),
    ({"max_num_seqs": 0}, "max_num_seqs and max_num_batched_tokens must be positive"),
])
def test_bad_settings_are_config_errors(setting, message):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**setting)
    assert str(e.value).startswith(message)
    assert not isinstance(e.value, InvalidRequestError)  # a setting, not a request: no HTTP 400 for it


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ConfigError, match="dtype must be auto, float32, bfloat16 or float16, got 'int3'"):
        _ = EngineConfig(dtype="int3").torch_dtype


def test_a_kv_budget_below_one_block_is_a_config_error(smollm):
    with pytest.raises(ConfigError, match=r"kv_budget of 1000 bytes holds no block of \d+ bytes"):
        LLMEngine(smollm, kv_budget=1000)


def test_the_cli_prints_one_line(tmp_path: Path):
    llmos = str(Path(sys.executable).with_name("llmos"))
    r = subprocess.run([llmos, "serve", "--kv-budget", "lots", "--port", "0"], capture_output=True, text=True,
                       timeout=300, env={"PATH": "/usr/bin:/bin", "LLMOS_HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert "cannot read 'lots' as a size" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1
