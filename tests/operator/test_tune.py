import json
import time

import pytest

from llmos.agents.operator.tune import (
    DEFAULTS,
    GRID,
    Trial,
    TuneBounds,
    Tuner,
    check_settings,
    coordinate_descent,
    write_config,
)


def test_only_grid_values_pass():
    assert check_settings({"block_size": 32}) == {**DEFAULTS, "block_size": 32}
    with pytest.raises(ValueError, match=r"block_size=12 is outside the allowed values \[8, 16, 32\]"):
        check_settings({"block_size": 12})
    with pytest.raises(ValueError, match=r"not tunable: \['swap_space'\]"):
        check_settings({"swap_space": "1GiB"})


def test_coordinate_descent_tries_neighbours_first_and_ends():
    seen: list[dict] = []
    order = []
    for c in coordinate_descent(lambda: DEFAULTS, lambda s: s in seen):
        seen.append(c)
        order.append(c)
    assert order[0] == DEFAULTS  # the centre itself is first (not yet tried here)
    assert order[1] == {**DEFAULTS, "max_num_seqs": 32}  # nearest value of the first setting next
    assert len(order) == 1 + sum(len(v) - 1 for v in GRID.values())


def test_a_short_search_stays_within_its_bound_and_writes_a_config(tmp_path):
    import torch

    from llmos.bench.workloads import BenchRequest
    from llmos.models.loader import load_model
    from llmos.models.registry import resolve_model

    loaded = load_model(resolve_model("smollm2-135m-instruct"), dtype=torch.float32,
                        device=torch.device("cpu"))
    reqs = [BenchRequest(list(range(100, 100 + n)), 4) for n in (8, 12)]
    tuner = Tuner(loaded, reqs, TuneBounds(budget_s=20.0, trial_s=20.0, compare_rounds=1))
    t0 = time.monotonic()
    result = tuner.search()
    assert time.monotonic() - t0 < 20.0 + 5.0  # the whole search, comparison included, keeps its bound
    assert result["trials"][0]["settings"] == DEFAULTS
    assert result["trials"][0]["tok_per_s"] > 0
    # the side-by-side runs share what is left of the budget (0 tok/s when a busy machine aborts one)
    assert len(result["default_runs"]) == len(result["best_runs"])
    path = write_config(tmp_path / "tuned.toml", result)
    text = path.read_text()
    assert "[engine]" in text and f"block_size = {result['best']['block_size']}" in text


def test_a_trial_over_its_memory_bound_is_aborted():
    import torch

    from llmos.bench.workloads import BenchRequest
    from llmos.models.loader import load_model
    from llmos.models.registry import resolve_model

    loaded = load_model(resolve_model("smollm2-135m-instruct"), dtype=torch.float32,
                        device=torch.device("cpu"))
    tuner = Tuner(loaded, [BenchRequest([100, 101, 102], 8)], TuneBounds(rss_bytes=1))
    trial = tuner.measure(DEFAULTS, 30.0)
    assert trial.tok_per_s == 0.0 and trial.note == "aborted: over the 0.0 GiB memory bound"


class _Synthetic(Tuner):
    """The search logic on a known objective: fastest at max_num_seqs=16, block_size=32."""

    def measure(self, settings, time_left):
        settings = check_settings(settings)
        score = 100 - abs(settings["max_num_seqs"] - 16) - 5 * abs(settings["block_size"] - 32) / 8
        return Trial(settings, score, 0.001)


def test_the_optimiser_finds_the_best_of_a_known_objective():
    result = _Synthetic(None, [], TuneBounds(budget_s=5.0)).search()
    assert result["best"] == {**DEFAULTS, "max_num_seqs": 16, "block_size": 32}
    assert result["gain"] == pytest.approx(100 / (100 - 48 - 10) - 1)
    assert len(result["trials"]) == len({json.dumps(t["settings"], sort_keys=True) for t in result["trials"]})
