"""Tile assignment: which consecutive chain tiles compute which output neurons of which layer.

Rules (docs/architecture.md sections 1 and 6):

* every layer gets >= 1 consecutive chain tiles, layers in model order;
* a tile computes a contiguous slice of its layer's outputs; every slice but the layer's last is a
  multiple of ``lanes``, so that the result flits of consecutive tiles concatenate into the layer's
  output vector without padding lanes in the middle;
* a tile holds ``N_o * K`` weight words (from word 0) plus the ``K``-word activation buffer behind
  them, which must fit ``arch.sram_words``, and ``N_o <= arch.max_tile_outputs``;
* tile ``j`` of a layer passes the results of tiles ``0..j-1`` through (``P`` = their result words);
  its estimated cycles per inference are ``K + P + N_o*K + 2 + N_r`` (see :func:`tile_cycles`);
* the pipeline's throughput is set by its slowest tile, so spare tiles go, one at a time, to the
  layer whose slowest tile is the slowest overall, as long as that makes it faster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from flowtile.arch import Arch

from .errors import CompileError

__all__ = ["TileSlice", "tile_cycles", "assign_tiles", "words"]


class _Layer(Protocol):
    name: str
    op: str

    @property
    def n_in(self) -> int: ...

    @property
    def n_out(self) -> int: ...


@dataclass(frozen=True)
class TileSlice:
    """One tile's share of a layer: outputs ``[start, start + n_out)``, after ``n_pass`` passed-through words."""

    layer: int
    start: int
    n_out: int
    n_in_words: int
    n_pass: int
    forward: bool  # more tiles of the same layer follow

    @property
    def stop(self) -> int:
        return self.start + self.n_out


def words(n: int, lanes: int) -> int:
    """Flits (SRAM words) holding ``n`` int8 values."""
    return -(-n // lanes)


def tile_cycles(n_in_words: int, n_pass: int, n_out: int, lanes: int) -> int:
    """Cycles between the starts of consecutive inferences of one unstalled tile (section 6, rule 4).

    Its ``K + P`` input transfers take one cycle each; the first of its ``N_r`` result flits follows the
    last input transfer by ``N_o*K + 3`` cycles, the other results and the next inference's first input
    transfer by one cycle each: ``(K + P - 1) + (N_o*K + 3) + (N_r - 1) + 1``. A pass-through tile
    (``N_o = 0``) just moves its ``K + P`` flits.
    """
    if n_out == 0:
        return n_in_words + n_pass
    return n_in_words + n_pass + n_out * n_in_words + 2 + words(n_out, lanes)


def _tile_capacity(k: int, arch: Arch) -> int:
    """Most outputs one tile can hold for a layer of ``k`` input words: SRAM and parameter table."""
    return min(arch.max_tile_outputs, (arch.sram_words - k) // k)


def _split(n_out: int, k: int, arch: Arch, layer: int, budget: float, max_tiles: float) -> list[TileSlice] | None:
    """Greedy split of one layer into slices whose tiles each take <= ``budget`` cycles, or None.

    Taking as many outputs as allowed on each tile is optimal: a fuller prefix only raises the pass
    count of later tiles by one word per ``lanes`` outputs it takes off them, which saves them ``k``
    weight words of compute per output.
    """
    lanes = arch.lanes
    capacity = _tile_capacity(k, arch)
    slices: list[TileSlice] = []
    start = n_pass = 0
    while start < n_out:
        if len(slices) >= max_tiles:
            return None
        remaining = n_out - start
        if remaining <= capacity and tile_cycles(k, n_pass, remaining, lanes) <= budget:
            take = remaining  # the layer's last tile: any size
        else:
            chunks = min(capacity // lanes, (remaining - 1) // lanes)
            if budget != float("inf"):
                chunks = min(chunks, int((budget - k - n_pass - 2) // (lanes * k + 1)))
            if chunks <= 0:
                return None
            take = chunks * lanes
        slices.append(TileSlice(layer, start, take, k, n_pass, forward=False))
        start += take
        n_pass += words(take, lanes)
    return [TileSlice(s.layer, s.start, s.n_out, s.n_in_words, s.n_pass, forward=i < len(slices) - 1)
            for i, s in enumerate(slices)]


def _slowest(slices: list[TileSlice], lanes: int) -> int:
    return max(tile_cycles(s.n_in_words, s.n_pass, s.n_out, lanes) for s in slices)


def _best_split(n_out: int, k: int, arch: Arch, layer: int, max_tiles: int) -> list[TileSlice]:
    """The split over at most ``max_tiles`` tiles whose slowest tile is fastest (binary search on the budget)."""
    best = _split(n_out, k, arch, layer, float("inf"), max_tiles)
    lo, hi = 0, _slowest(best, arch.lanes)  # infeasible below lo + 1, feasible at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = _split(n_out, k, arch, layer, mid, max_tiles)
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return best


def _describe(layer: _Layer) -> str:
    return f"layer '{layer.name}' ({layer.op}, {layer.n_in} -> {layer.n_out})"


def _check_one_tile_fits(layer: _Layer, k: int, arch: Arch) -> None:
    """A tile must hold one output (or, for a layer split over tiles, one flit of outputs) plus the input."""
    lanes, capacity = arch.lanes, _tile_capacity(k, arch)
    if capacity >= 1 and (layer.n_out <= capacity or capacity >= lanes):
        return
    outputs = 1 if capacity < 1 else lanes
    raise CompileError(
        f"{_describe(layer)}: a tile must hold at least {outputs} output(s), which need "
        f"{(outputs + 1) * k * lanes} bytes of SRAM ({k}-word weight rows plus the {k * lanes}-byte input buffer) "
        f"but holds at most {max(capacity, 0)}: a tile has {arch.sram_bytes} bytes (arch field 'sram_bytes') "
        f"and {arch.max_tile_outputs} parameter entries (arch field 'max_tile_outputs')")


def _does_not_fit(layers: Sequence[_Layer], ks: list[int], counts: list[int], arch: Arch, grid: str) -> CompileError:
    """The error for a model whose layers need more tiles than the grid has, naming the largest layer."""
    lanes = arch.lanes
    worst = max(range(len(layers)), key=lambda i: counts[i])
    layer, k = layers[worst], ks[worst]
    per_tile = _tile_capacity(k, arch)
    limit = "arch field 'max_tile_outputs'" if per_tile == arch.max_tile_outputs else "arch field 'sram_bytes'"
    split_note = (f" ({per_tile // lanes * lanes} in a tile that is not the layer's last: those hold whole "
                  f"{lanes}-lane flits)" if per_tile % lanes and layer.n_out > per_tile else "")
    total = sum(l.n_out * kk * lanes for l, kk in zip(layers, ks))
    return CompileError(
        f"model does not fit {grid}: its layers need {sum(counts)} tiles, there are {arch.n_tiles}; "
        f"{_describe(layer)} alone needs {counts[worst]}: its weights need {layer.n_out * k * lanes} bytes "
        f"(rows padded to {k} words of {lanes} bytes) and each of its tiles also buffers the {k * lanes}-byte "
        f"input, so a {arch.sram_bytes}-byte tile holds at most {per_tile} outputs ({limit}){split_note}; "
        f"all weights need {total} bytes, the grid has {arch.n_tiles * arch.sram_bytes} bytes of SRAM")


def assign_tiles(layers: Sequence[_Layer], arch: Arch) -> list[list[TileSlice]]:
    """Slices per layer, in chain order (layer 0 starts at chain position 0); CompileError if it cannot fit."""
    lanes, n_tiles = arch.lanes, arch.n_tiles
    grid = f"the {arch.rows}x{arch.cols} grid (arch fields 'rows', 'cols')"
    ks = [words(layer.n_in, lanes) for layer in layers]
    if len(layers) > n_tiles:
        total = sum(layer.n_out * k * lanes for layer, k in zip(layers, ks))  # weight bytes, rows padded to words
        raise CompileError(f"the model has {len(layers)} layers but {grid} has {n_tiles} tiles, and every layer "
                           f"needs at least one; its weights need {total} bytes, the grid has "
                           f"{n_tiles * arch.sram_bytes} bytes of SRAM")
    for layer, k in zip(layers, ks):
        _check_one_tile_fits(layer, k, arch)
    unlimited = float("inf")
    splits = [_split(layer.n_out, k, arch, i, unlimited, unlimited) for i, (layer, k) in enumerate(zip(layers, ks))]
    if sum(len(s) for s in splits) > n_tiles:
        raise _does_not_fit(layers, ks, [len(s) for s in splits], arch, grid)
    # balance: spare tiles to the bottleneck layer while that makes the bottleneck faster
    cost = [_slowest(s, lanes) for s in splits]
    while sum(len(s) for s in splits) < n_tiles:
        slowest = max(range(len(layers)), key=lambda i: cost[i])
        candidate = _best_split(layers[slowest].n_out, ks[slowest], arch, slowest, len(splits[slowest]) + 1)
        if _slowest(candidate, lanes) >= cost[slowest]:
            break
        splits[slowest], cost[slowest] = candidate, _slowest(candidate, lanes)
    return splits
