"""The embedded model, loaded once for the lab tests."""

import pytest

from llmos.lab._common import load


@pytest.fixture(scope="session")
def model():
    return load()
