"""Shared pytest fixtures."""
import gc
import warnings

import pytest


@pytest.fixture
def collect_unused_components():
    """Validation tests build Amaranth components that raise or are never elaborated, on purpose:
    collect them while Amaranth's "created but never used" warning is silenced."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()
