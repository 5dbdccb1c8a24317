"""Shared fixtures. Helpers that build data live in tests/synthetic.py."""
import pytest

from synthetic import make_tiny_store


@pytest.fixture
def tiny_store(tmp_path):
    """Path of a small valid cifar10.h5 (500 train / 100 test, learnable) in tmp_path."""
    return make_tiny_store(tmp_path / "data" / "cifar10.h5")
