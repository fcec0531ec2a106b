"""Hand-built flowtile programs for tests: dense layers mapped onto the chain as docs/architecture.md
section 1 describes, without the compiler.

    layers = [Dense(W, bias, multiplier, shift, zp_out, clamp_lo, clamp_hi, tiles=2), ...]
    program = build_program(Arch(rows=2, cols=2, lanes=4), layers)
    golden = dense_golden(layers, x_int8)          # plain numpy reference of the same arithmetic

Mapping: a layer split over ``m`` consecutive chain tiles; tile ``i`` of ``m`` has ``n_in_words = K``
(words of the layer input), ``forward = (i < m-1)``, ``n_pass`` = result words of tiles ``0..i-1``,
``n_out`` = its slice (a multiple of ``lanes`` except the last), ``w_base = 0``,
``act_base = n_out * K``, destination the next chain tile (the host for the last chain position).
Tiles after the last layer pass the output through (``tail="pass"``), or stay idle while the last
layer's last tile sends straight to the host along the XY route (``tail="direct"``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from flowtile.arch import CONFIG_FIELDS, Arch
from flowtile.program import LayerInfo, Program, TensorSpec, TileProgram

__all__ = ["Dense", "build_program", "dense_golden", "split_outputs", "blank_config"]


class Dense(NamedTuple):
    """One int8 dense layer. ``multiplier``/``shift`` may be scalars or per-output arrays. ``tiles``
    is the number of chain tiles it spans, or the explicit output count of each of them."""

    weights: np.ndarray            # int8 [n_out, n_in]
    bias: np.ndarray               # int32-range [n_out]
    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zp_out: int = 0
    clamp_lo: int = -128
    clamp_hi: int = 127
    tiles: int | Sequence[int] = 1

    @property
    def n_out(self) -> int:
        return self.weights.shape[0]

    @property
    def n_in(self) -> int:
        return self.weights.shape[1]


def blank_config() -> dict[str, int]:
    """Every register zero: an idle tile."""
    return {name: 0 for name, _, _ in CONFIG_FIELDS}


def split_outputs(n_out: int, tiles: int | Sequence[int], lanes: int) -> list[int]:
    """Output counts per tile: whole flits as evenly as possible (or the explicit split, checked)."""
    if not isinstance(tiles, int):
        counts = list(tiles)
        if sum(counts) != n_out or any(c <= 0 for c in counts) or any(c % lanes for c in counts[:-1]):
            raise ValueError(f"split {counts} of {n_out} outputs: positive, summing to n_out, "
                             f"multiples of {lanes} except the last")
        return counts
    words = -(-n_out // lanes)
    if not 1 <= tiles <= words:
        raise ValueError(f"{n_out} outputs ({words} flits) cannot be split over {tiles} tiles")
    per_tile = [words // tiles + (i < words % tiles) for i in range(tiles)]
    counts = [w * lanes for w in per_tile]
    counts[-1] -= sum(counts) - n_out
    return counts


def _per_output(value, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.int64), (n,)).copy()


def build_program(arch: Arch, layers: Sequence[Dense], *, tail: str = "pass",
                  act_fill: np.random.Generator | None = None) -> Program:
    """A validated Program for ``layers`` on ``arch``. ``act_fill``: fill activation buffers with
    random bytes (the hardware overwrites them) instead of zeros."""
    lanes = arch.lanes
    tiles: list[TileProgram] = []
    infos = []
    for index, layer in enumerate(layers):
        if index and layer.n_in != layers[index - 1].n_out:
            raise ValueError(f"layer {index} has {layer.n_in} inputs, layer {index - 1} {layers[index - 1].n_out} outputs")
        k_words = -(-layer.n_in // lanes)
        padded = np.zeros((layer.n_out, k_words * lanes), dtype=np.int8)
        padded[:, : layer.n_in] = layer.weights
        multiplier = _per_output(layer.multiplier, layer.n_out)
        shift = _per_output(layer.shift, layer.n_out)
        bias = _per_output(layer.bias, layer.n_out)
        start = passed = 0
        counts = split_outputs(layer.n_out, layer.tiles, lanes)
        coords = []
        for i, n_out in enumerate(counts):
            position = len(tiles)
            if position >= arch.n_tiles:
                raise ValueError(f"the layers need more than the {arch.n_tiles} tiles of the grid")
            row, col = arch.chain_position(position)
            weights = padded[start:start + n_out].reshape(n_out * k_words, lanes)
            activations = (np.zeros((k_words, lanes), dtype=np.int8) if act_fill is None
                           else act_fill.integers(-128, 128, (k_words, lanes), dtype=np.int8))
            config = blank_config()
            config.update(n_in_words=k_words, forward=int(i < len(counts) - 1), n_pass=passed, n_out=n_out,
                          w_base=0, act_base=n_out * k_words, zp_out=layer.zp_out, clamp_lo=layer.clamp_lo,
                          clamp_hi=layer.clamp_hi)
            params = np.stack([bias[start:start + n_out], multiplier[start:start + n_out],
                               shift[start:start + n_out]], axis=1)
            tiles.append(TileProgram(row, col, config, np.concatenate([weights, activations]), params))
            coords.append((row, col))
            start += n_out
            passed += -(-n_out // lanes)
        infos.append(LayerInfo(f"dense{index}", "dense", layer.n_in, layer.n_out, tuple(coords),
                               relu=layer.clamp_lo > -128))
    last_layer_tile = len(tiles) - 1
    output_words = -(-layers[-1].n_out // lanes)
    while len(tiles) < arch.n_tiles:
        row, col = arch.chain_position(len(tiles))
        config = blank_config()
        if tail == "pass":
            config["n_pass"] = output_words
        elif tail != "direct":
            raise ValueError(f"tail must be 'pass' or 'direct', got {tail!r}")
        tiles.append(TileProgram(row, col, config, np.zeros((0, lanes), np.int8), np.zeros((0, 3), np.int64)))
    for position, tile in enumerate(tiles):
        if tile.config["n_pass"] or tile.config["n_in_words"]:
            last = position == arch.n_tiles - 1 or (tail == "direct" and position == last_layer_tile)
            if last:
                tile.config["dest_host"] = 1
            else:
                tile.config["dest_row"], tile.config["dest_col"] = arch.chain_position(position + 1)
    program = Program(arch=arch, input=TensorSpec("x", (layers[0].n_in,), 1.0, 0),
                      output=TensorSpec("y", (layers[-1].n_out,), 1.0, 0), layers=infos, tiles=tiles,
                      model_name="program_builder")
    program.validate()
    return program


def dense_golden(layers: Sequence[Dense], x: np.ndarray) -> np.ndarray:
    """Plain numpy forward pass of int8 dense layers: int8 ``[batch, n_in]`` -> int8 ``[batch, n_out]``.

    ``acc = wrap32(bias + x @ W^T)``, ``y = clamp(((acc * M + 2^(S-1)) >> S) + zp, lo, hi)``.
    """
    values = np.asarray(x, dtype=np.int64)
    for layer in layers:
        acc = values @ layer.weights.astype(np.int64).T + _per_output(layer.bias, layer.n_out)
        acc = (acc + 2**31) % 2**32 - 2**31
        multiplier = _per_output(layer.multiplier, layer.n_out)
        shift = _per_output(layer.shift, layer.n_out)
        scaled = (acc * multiplier + (np.int64(1) << (shift - 1))) >> shift
        values = np.clip(scaled + layer.zp_out, layer.clamp_lo, layer.clamp_hi)
    return values.astype(np.int8)
