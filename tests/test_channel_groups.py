"""Channel groups of the per-word ops (issue 12 item 1: a layer wider than one tile's limits is split, whatever its
op): a depthwise convolution, a max pool, a residual Add and a global average pool with more channels than
``max_tile_outputs`` are split into tiles that each compute a group of whole words of every pixel (registers
``group_word_begin`` and ``group_words``, docs/architecture.md section 4.4), the later groups passing the earlier
groups' words of each pixel before their own. And bands of a residual Add too large for one tile's SRAM: each band
stores only its rows of both operand maps, in two store ranges (registers ``store2_begin``, ``store2_end``,
section 4.2).

Oracles: onnxruntime for the emulator (within 1 LSB, as every compiled model), the emulator for Verilator (bit and
cycle exact). Both networks run on one small Arch (lanes 4, at most 8 outputs a tile), so one Verilator build.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from flowtile.arch import OP_ADD, OP_LANE, OP_MAX, Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator
from flowtile.testing.program_builder import stream_offsets
from flowtile.testing.random_models import quantize_qdq, random_float_cnn, random_float_resnet

#: 12- and 16-channel layers (3 and 4 words of 4 lanes) against at most 8 outputs (2 words) a tile
ARCH = lean_arch(rows=4, cols=4, lanes=4, sram_bytes=2048, max_tile_outputs=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("channel_groups")
    rng = np.random.default_rng(3)
    floats = {
        # stem to 12 channels, an inverted residual: 1x1 to 16, 3x3 depthwise (16), 1x1 back to 12, Add (12); a
        # global average pool (12) and the classifier
        "inverted": (random_float_resnet(rng, (4, 6, 6), 12, [{"kind": "inverted", "expand": 16}], 5), (4, 6, 6)),
        # a 3x3 convolution to 12 channels and a 2x2 max pool (12)
        "pool": (random_float_cnn(rng, (3, 8, 8), [{"out": 12, "k": 3, "pad": 1, "pool": (2, 2)}], 5), (3, 8, 8)),
        # a basic residual block on an 8x8 map of 12 channels: both operands of its Add (2 x 192 words, twice) do
        # not fit a 512-word tile, so it splits into bands of rows (and channel groups)
        "residual": (random_float_resnet(rng, (3, 8, 8), 12, [{"kind": "basic", "out": 12}], 5), (3, 8, 8)),
    }
    result = {}
    for name, (model, shape) in floats.items():
        onnx.save(model, tmp_path / f"{name}.onnx")
        calibration = rng.standard_normal((16, *shape)).astype(np.float32)
        result[name] = (quantize_qdq(tmp_path / f"{name}.onnx", tmp_path / f"{name}_qdq.onnx", calibration,
                                     activation_uint8=False, per_channel=True), shape)
    return result


def grouped(program) -> dict[int, list[tuple[int, int]]]:
    """op -> [(group_word_begin, group_words)] of the tiles that compute a channel group of a per-word op."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for tile in program.tiles:
        c = tile.config
        if c.group_words:
            groups.setdefault(c.op, []).append((c.group_word_begin, c.group_words))
    return groups


@pytest.mark.parametrize("name, ops", [("inverted", {OP_LANE, OP_ADD}), ("pool", {OP_MAX}), ("residual", {OP_ADD})])
def test_wide_per_word_layers_split_into_channel_groups(models, name, ops):
    model, shape = models[name]
    program = compile_model(model, ARCH)
    groups = grouped(program)
    assert ops <= set(groups), groups
    for op in ops:  # the groups of a band cover its pixel's words in order, none wider than a tile's outputs
        begins = [begin for begin, _ in groups[op]]
        assert 0 in begins and max(words for _, words in groups[op]) * ARCH.lanes <= ARCH.max_tile_outputs
    x = np.random.default_rng(7).standard_normal((6, *shape)).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x)


def test_a_group_is_at_least_a_word(models):
    """The smallest group is one word of every pixel: with 8 lanes and at most 4 outputs a tile no group fits, and
    the compiler says so in one line naming the layer and the arch field."""
    model, _ = models["pool"]
    with pytest.raises(CompileError, match=r"layer 'conv0' \(Conv, .*output channels exceed arch field "
                                           r"'max_tile_outputs' = 4") as refused:
        compile_model(model, ARCH.replace(max_tile_outputs=4, lanes=8, sram_bytes=4096))
    assert "\n" not in str(refused.value)


def test_add_bands_store_their_rows_of_both_operands(models):
    """The residual Add's bands each store their rows of both operand maps (two store ranges): fewer words than
    both whole maps, operand b right behind operand a's rows, and the outputs still onnxruntime's."""
    model, shape = models["residual"]
    program = compile_model(model, ARCH)
    tiles = {(t.row, t.col): t.config for t in program.tiles}
    adds = [[tiles[key] for key in info.tiles] for info in program.layers if info.op == "Add"]
    # each band's store ranges where they sit in the Add's stream (a tile's stream starts where the one before it
    # forwards from)
    banded = [(offset + c.store_begin, offset + c.store2_begin, c)
              for configs in adds for offset, c in zip(stream_offsets(configs), configs) if c.store2_end]
    assert banded and len({(first, second) for first, second, _ in banded}) >= 2   # two bands at least
    banded = [c for *_, c in banded]
    map_words = 8 * 8 * 3
    for c in banded:
        assert c.stored_words < 2 * map_words and c.stored_words == 2 * c.in_height * 8 * 3
        assert (c.operand_a_offset, c.operand_b_offset) in ((0, c.store_end - c.store_begin),
                                                            (c.store_end - c.store_begin, 0))
        assert c.act_base + 2 * c.stored_words <= ARCH.sram_words


@pytest.mark.rtl
@pytest.mark.parametrize("name", ["inverted", "pool", "residual"])
def test_channel_groups_rtl_matches_emulator(models, name):
    model, shape = models[name]
    program = compile_model(model, ARCH)
    assert grouped(program)
    x = np.random.default_rng(11).standard_normal((3, *shape)).astype(np.float32)
    assert_rtl_matches_emulator(program, x)
