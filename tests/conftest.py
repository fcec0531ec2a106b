"""Shared pytest fixtures."""
import gc
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def collect_unused_components():
    """Validation tests build Amaranth components that raise or are never elaborated, on purpose:
    collect them while Amaranth's "created but never used" warning is silenced."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


@pytest.fixture(scope="session")
def digits_program(tmp_path_factory):
    """models/digits_mlp.onnx compiled by ``flowtile compile`` into a program directory (read it, copy it to edit)."""
    from flowtile import cli
    path = tmp_path_factory.mktemp("digits") / "prog"
    assert cli.main(["compile", str(ROOT / "models" / "digits_mlp.onnx"), "-o", str(path)]) == 0
    return path


@pytest.fixture
def digits_inputs(tmp_path):
    """The first two samples of models/digits_test.npz saved as ``tmp_path / "x.npy"``; returns that path."""
    import numpy as np
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:2])
    return tmp_path / "x.npy"
