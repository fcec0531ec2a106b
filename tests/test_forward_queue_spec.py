"""The forward queue in the tile SRAM (docs/architecture.md section 4): the registers' rules and their messages,
where :meth:`TileConfig.with_queue` puts a queue, the removed Arch field, the result ring's own depth, and what the
compiler gives each tile. The hardware queue is tested in test_hdl_pe_components.py / test_hdl_pe.py, the emulator's
per-tile depth in test_emulator.py."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from flowtile.arch import OP_MAC, Arch, ArchError
from flowtile.testing.archs import lean_arch
from flowtile.tile_config import ConfigError, TileConfig
from flowtile.testing.program_builder import Dense, build_program

ROOT = Path(__file__).resolve().parents[1]
ARCH = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=256)   # 64 SRAM words

#: A computing dense tile: 4 input words, all stored (banks [20, 28)), 2 outputs (weights [0, 8)), forwarding its
#: input (4 queued words).
COMPUTING = TileConfig(n_in_words=4, store_begin=0, store_end=4, forward_begin=0, forward_end=4, n_out=2, w_base=0,
                       act_base=20, clamp_lo=-128, clamp_hi=127, op=OP_MAC, in_height=1, in_width=1,
                       words_per_pixel=4, kernel_h=1, kernel_w=1, stride=1, out_rows=1, out_width=1)


def test_a_tile_that_queues_needs_a_queue():
    with pytest.raises(ConfigError, match=re.escape(
            "config register queue_words = 0, but the tile forwards and passes forward_end - forward_begin + n_pass "
            "= 4 words per inference through its forward queue (queue_words >= 1 needed; section 4)")):
        COMPUTING.validate(ARCH)
    TileConfig(n_pass=3, queue_base=63, queue_words=1).validate(ARCH)   # one word is enough (it only waits)
    COMPUTING.replace(forward_end=0).validate(ARCH)                      # nothing queued: no queue


@pytest.mark.parametrize("base, words, message", [
    (60, 5, "config registers queue_base + queue_words = 60 + 5 = 65 exceed sram_words = 64"),
    (26, 4, "config registers queue_base = 26, queue_words = 4: the forward queue [26, 30) overlaps [act_base, "
            "act_base + 2 * (store_end - store_begin)) = [20, 28) (section 4)"),
    (7, 2, "config registers queue_base = 7, queue_words = 2: the forward queue [7, 9) overlaps [w_base, w_base + the "
           "weight words) = [0, 8) (section 4)"),
])
def test_queue_region_rules(base, words, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        COMPUTING.replace(queue_base=base, queue_words=words).validate(ARCH)


def test_queue_between_weights_and_banks_is_fine():
    COMPUTING.replace(queue_base=8, queue_words=12).validate(ARCH)      # [8, 20): between weights and banks


def test_with_queue_places_it_after_weights_and_banks():
    placed = COMPUTING.with_queue(ARCH)
    assert (placed.queue_base, placed.queue_words) == (28, 36)          # every free word behind the banks
    placed.validate(ARCH)
    assert (COMPUTING.with_queue(ARCH, 3).queue_base, COMPUTING.with_queue(ARCH, 3).queue_words) == (28, 3)
    idle = TileConfig().with_queue(ARCH)
    assert (idle.queue_base, idle.queue_words) == (0, 0)
    with pytest.raises(ConfigError, match=re.escape("a forward queue of 37 words does not fit behind the tile's "
                                                    "weights and banks (SRAM words 28..63 are free, sram_words = 64)")):
        COMPUTING.with_queue(ARCH, 37)


def test_forward_queue_words_is_gone_with_a_clear_error(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("rows = 2\nforward_queue_words = 1024\n")
    with pytest.raises(ArchError, match=r"arch field 'forward_queue_words' no longer exists: a tile's forward queue is "
                                        r"the SRAM its weights and banks leave free"):
        Arch.from_toml(path)


def test_result_ring_depth_is_its_own_field():
    assert lean_arch(max_tile_outputs=16).result_words == lean_arch().result_ring_words == 1024
    assert lean_arch(result_ring_words=3).result_words == 3
    assert lean_arch(max_tile_outputs=20, lanes=8).param_rows_per_lane == 3
    with pytest.raises(ArchError, match=r"arch field 'result_ring_words' = 0 is invalid: must be in 1\.\.65536"):
        lean_arch(result_ring_words=0)


def test_program_builder_queues():
    rng = np.random.default_rng(0)
    layers = [Dense(rng.integers(-128, 128, (8, 16), dtype=np.int8), rng.integers(-99, 99, 8), 1 << 30, 40, 0,
                    -128, 127, 2)]
    arch = lean_arch(rows=1, cols=3, lanes=4, sram_bytes=1024)
    deep = build_program(arch, layers)
    shallow = build_program(arch, layers, queue_words=2)
    for tile in deep.tiles:
        c = tile.config
        assert c.queue_words == (arch.sram_words - c.data_end if c.queued_words else 0)
    assert [t.config.queue_words for t in shallow.tiles] == [2 if t.config.queued_words else 0 for t in shallow.tiles]


def test_compiler_gives_every_tile_its_free_sram():
    from flowtile.compiler import compile_model
    program = compile_model(str(ROOT / "models" / "digits_cnn.onnx"), lean_arch(rows=4, cols=4))
    queued = [t.config for t in program.tiles if t.config.queued_words]
    assert queued
    for c in queued:
        assert (c.queue_base, c.queue_base + c.queue_words) == (c.data_end, program.arch.sram_words)


def test_deep_queues_where_the_sram_allows():
    """ResNet-8 (MLPerf Tiny shape) on 8x8 tiles of 64 KiB: every tile that computes holds all the words it forwards
    and passes per inference in its queue (so it takes a whole inference in while it computes), at no cost to the
    estimate; on 32 KiB tiles some cannot, and the report says so."""
    from flowtile.compiler import compile_model, int8_model, report
    model = int8_model(ROOT / "models" / "public" / "mlperf_resnet8_qdq.onnx")
    roomy = compile_model(model, lean_arch(sram_bytes=65536).with_grid("8x8"))
    assert all(t.config.queued_words <= t.config.queue_words for t in roomy.tiles if t.config.n_out)
    assert "cannot take a whole inference in" not in report(roomy)
    tight = compile_model(model, lean_arch().with_grid("8x8"))
    assert re.search(r"\d+ tile\(s\) forward and pass more words per inference than their forward queue",
                     report(tight))
