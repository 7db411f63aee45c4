import numpy as np
import pytest

from llmos.models.loader import LoadedModel, load_model


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded model, loaded once for the whole run."""
    return load_model("smollm2-135m-instruct")


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 10000, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]
