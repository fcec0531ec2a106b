"""The Arch most of the test suite is written against.

Until the eleventh session the built-in default was one layer a tile and 32 KiB of SRAM; the unit, layout and RTL tests
pin those exact tiles (a layer's tiles and their registers, the SRAM a layer needs, which design Verilator builds).
They build their Arch from :func:`lean_arch`, the committed preset ``archs/lean.toml``, so that the default's move
(to 64 KiB tiles of 8 contexts, README) changes none of them; the default itself is tested where the suite says so
(tests/test_default_arch.py, the CLI tests, the contexts tests).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flowtile.arch import Arch

LEAN_TOML = Path(__file__).resolve().parents[2] / "archs" / "lean.toml"


@lru_cache(maxsize=None)
def _lean() -> Arch:
    return Arch.from_toml(LEAN_TOML)


def lean_arch(**fields) -> Arch:
    """``archs/lean.toml`` (one context, 32 KiB) with ``fields`` replaced: what ``Arch(**fields)`` was before the
    default moved."""
    return _lean().replace(**fields)
