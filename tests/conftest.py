"""Shared fixtures. Helpers that build data live in tests/synthetic.py.

Fuzz tests (tests/test_fuzz_*.py) use hypothesis with one profile: derandomized (the same examples
on every run, so CI is reproducible) and a fixed budget per test; `PARTRAIN_FUZZ_EXAMPLES=N`
raises the budget for a longer hunt (`--hypothesis-show-statistics` prints what ran)."""
import os

import pytest
from hypothesis import HealthCheck, settings

from synthetic import make_tiny_store

settings.register_profile(
    "partrain", derandomize=True, deadline=None, print_blob=True, database=None,
    max_examples=int(os.environ.get("PARTRAIN_FUZZ_EXAMPLES", "100")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("partrain")


@pytest.fixture
def tiny_store(tmp_path):
    """Path of a small valid cifar10.h5 (500 train / 100 test, learnable) in tmp_path."""
    return make_tiny_store(tmp_path / "data" / "cifar10.h5")
