"""Compiler on several chips (issue 11 item 4, docs/architecture.md section 12): programs for a line of chips
validate, route every chip's exit tile over its link to tile (0, 0) of the next, size the links' registers; the
partition fits networks one chip cannot hold, cuts where the stream is narrow, and refuses what it cannot build in
one line; the report gives per-chip and per-link figures."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from flowtile.testing.archs import lean_arch
from flowtile.compiler import (CompileError, build_program, chip_macs, compile_model, estimated_interval,
                               import_onnx, link_cycles, lower_layers, report)
from flowtile.link_format import LinkGeometry
from flowtile.compiler.emit import tile_program_estimate
from flowtile.program import Program
from flowtile.testing.random_models import random_float_cnn, random_float_mlp, random_float_resnet

SMALL = lean_arch(rows=2, cols=2, lanes=8)


def _compile(model, calibration, arch, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_model(model, arch, calibration=calibration, **options)


def mlp(widths, seed=0):
    rng = np.random.default_rng(seed)
    return random_float_mlp(rng, widths), rng.standard_normal((32, widths[0])).astype(np.float32)


def cnn(seed=0):
    """Five layers (Conv, MaxPool, Conv, MaxPool, Gemm): more than a 2x2 chip's four tiles."""
    rng = np.random.default_rng(seed)
    model = random_float_cnn(rng, (3, 12, 12), [{"out": 8, "k": 3, "pad": 1, "pool": (2, 2)},
                                                {"out": 16, "k": 3, "pad": 1, "pool": (2, 2)}], 10)
    return model, rng.standard_normal((32, 3, 12, 12)).astype(np.float32)


def resnet(seed=0):
    """Ten layers with two residual blocks (skip tensors ride in the stream across the cuts)."""
    rng = np.random.default_rng(seed)
    model = random_float_resnet(rng, (3, 8, 8), 8, [{"kind": "basic", "out": 8},
                                                     {"kind": "basic", "out": 16, "stride": 2}], 10)
    return model, rng.standard_normal((32, 3, 8, 8)).astype(np.float32)


def check_system(program: Program) -> None:
    """The invariants of a multi-chip program beyond Program.validate: tiles in system-chain order with their chip,
    one stream along the whole chain, routes, link registers; every tile that forwards or passes words has all the
    SRAM its weights and banks leave free as its forward queue (registers queue_base, queue_words)."""
    program.validate()
    arch, lanes, n = program.arch, program.arch.lanes, program.arch.n_tiles
    assert len(program.tiles) == arch.system_tiles and len(program.links) == arch.chips - 1
    emitted = program.program_input_words  # what reaches each tile: the stream is one line through every chip
    for position, tile in enumerate(program.tiles):
        c = tile.config
        assert (tile.chip, tile.row, tile.col) == arch.system_position(position)
        assert c.n_in_words + c.n_pass == emitted, f"tile {tile.key} takes {c.n_in_words}+{c.n_pass}, gets {emitted}"
        if c.queued_words:
            assert (c.queue_base, c.queue_base + c.queue_words) == (c.data_end, arch.sram_words), \
                f"tile {tile.key}: forward queue [{c.queue_base}, {c.queue_base + c.queue_words}), free SRAM " \
                f"[{c.data_end}, {arch.sram_words})"
        emitted = c.output_flits(lanes)
        chip, within = divmod(position, n)
        if within == n - 1:
            assert c.dest_host == 1
            if chip < arch.chips - 1:  # into link `chip`, addressed to the next chip's first tile
                assert (c.dest_row, c.dest_col) == (0, 0)
                assert program.links[chip].inference_flits == emitted
        else:
            assert c.dest_host == 0 and (c.dest_row, c.dest_col) == arch.chain_position(within + 1)
    assert emitted == program.program_output_words
    for layer in program.layers:  # report-only places name the chip
        assert all(len(place) == 3 and place[0] < arch.chips for place in layer.tiles)


@pytest.mark.parametrize("make, chips", [(lambda: mlp([64, 128, 32, 10]), 2), (lambda: mlp([64, 128, 32, 10]), 4),
                                         (cnn, 2), (cnn, 4), (resnet, 3), (resnet, 4)],
                         ids=["mlp-2", "mlp-4", "cnn-2", "cnn-4", "resnet-3", "resnet-4"])
def test_programs_validate_and_route_over_links(make, chips, tmp_path):
    model, calibration = make()
    arch = SMALL.replace(chips=chips)
    program = _compile(model, calibration, arch)
    check_system(program)
    assert {t.chip for t in program.tiles} == set(range(chips))
    loaded = Program.load(program.save(tmp_path / "prog"))
    check_system(loaded)
    assert [link.inference_flits for link in loaded.links] == [link.inference_flits for link in program.links]
    assert sum(chip_macs(program)) == pytest.approx(program.macs_per_inference * program.replicas,
                                                    abs=len(program.layers))


def test_network_too_large_for_one_chip_fits_two_and_four():
    model, calibration = cnn()
    with pytest.raises(CompileError, match=r"2x2 grid"):
        _compile(model, calibration, SMALL)
    for chips in (2, 4):
        program = _compile(model, calibration, SMALL.replace(chips=chips))
        check_system(program)
        assert sum(1 for t in program.tiles if t.config.n_out) > SMALL.n_tiles


def test_layer_split_across_a_chip_boundary():
    """A 64 -> 512 layer takes more tiles than a 2x2 chip has: its slices run on over into the next chip, and the
    link between them carries the whole stream (the input) plus the results of the slices before the cut."""
    model, calibration = mlp([64, 512, 10], seed=1)
    arch = SMALL.replace(chips=2, link_bits_per_cycle=SMALL.flit_bits)
    program = _compile(model, calibration, arch)
    check_system(program)
    first = program.layers[0]
    assert {place[0] for place in first.tiles} == {0, 1}
    exit_tile = program.tiles[arch.n_tiles - 1].config
    assert exit_tile.n_out and exit_tile.forwarded_words == exit_tile.n_in_words == 64 // 8
    assert program.links[0].inference_flits == 8 + exit_tile.n_pass + exit_tile.result_words(8)


def naive_fill_first(model, arch, calibration) -> int:
    """Estimated interval of the placement that fills chip 0 first: the same network on one chip with all the
    system's tiles (the same chain of slices), cut every ``n_tiles`` positions."""
    big = _compile(model, calibration, arch.replace(chips=1, cols=arch.cols * arch.chips))
    cuts = [big.tiles[(k + 1) * arch.n_tiles - 1].config.output_flits(arch.lanes) for k in range(arch.chips - 1)]
    return max([estimated_interval(big)] + [link_cycles(arch, flits) for flits in cuts])


def test_cut_lands_at_the_narrow_tensor():
    """64 -> 64 -> 64 -> 8 -> 64 -> 64 -> 64 -> 10 on two 2x2 chips with one-bit links: the cut goes where the
    stream is one flit (the 8-wide tensor), not at the fourth tile, and the estimated interval is shorter."""
    model, calibration = mlp([64, 64, 64, 8, 64, 64, 64, 10])
    # frames of 4 flits: the 8-flit 64-wide stream takes two frames, the 8-wide one one (frames are fixed-size, so
    # with the default 16 both would take one frame and cost the same)
    arch = SMALL.replace(chips=2, link_bits_per_cycle=1, link_frame_flits=4)
    program = _compile(model, calibration, arch)
    check_system(program)
    assert program.links[0].inference_flits == 1
    assert [place[0] for place in program.layers[2].tiles] == [0]  # the layer computing the 8-wide tensor
    assert [place[0] for place in program.layers[3].tiles] == [1]
    chosen, naive = estimated_interval(program), naive_fill_first(model, arch, calibration)
    assert chosen < naive, (chosen, naive)


@pytest.mark.parametrize("chips", [2, 4])
def test_cut_beats_fill_first_with_slow_links(chips):
    model, calibration = mlp([64, 128, 8, 128, 10])
    arch = SMALL.replace(chips=chips, link_bits_per_cycle=1, link_frame_flits=4)   # as above: streams of 2+ frames
    program = _compile(model, calibration, arch)
    check_system(program)
    assert program.links[0].inference_flits == 1
    assert estimated_interval(program) < naive_fill_first(model, arch, calibration)


def test_slow_links_keep_the_network_on_few_chips():
    """When every feature map costs more on the link than the tiles gain, the chips after the network only pass
    the output through: the links carry the logits (one copy of the network: replicas=1; with copies each link also
    carries the later copies' inputs, test_replication.py)."""
    model, calibration = cnn()
    program = _compile(model, calibration, SMALL.replace(chips=4, link_bits_per_cycle=1), replicas=1)
    check_system(program)
    assert program.links[-1].inference_flits == program.output_words
    assert all(t.config.n_out == 0 for t in program.tiles[3 * SMALL.n_tiles:])



def test_when_a_link_binds_the_spare_tiles_give_every_tile_slack():
    """A link slower than the tiles sets the interval; the chips' spare tiles then take the slices of the lowest tile
    budget whose cuts keep every link within it, instead of passing the stream through: the interval is the link's,
    and every tile has slack below it (which absorbs the bursts of tiles whose queues are short)."""
    model, calibration = mlp([64, 128, 8, 128, 10])
    arch = SMALL.replace(chips=2, link_bits_per_cycle=1)
    program = _compile(model, calibration, arch, replicas=1)
    check_system(program)
    bound = link_cycles(arch, program.links[0].inference_flits, program.links[0].segments)
    assert estimated_interval(program) == bound
    periods = [t.config.tile_period_cycles(arch.lanes) for t in program.tiles if t.config.n_out]
    assert len(periods) > len(program.layers) and 2 * max(periods) < bound

def test_link_cycles_follow_the_link_format():
    """At 1/16 and 1/64 of the flit width the credit and replay windows cover the round trip: a link is busy
    frames x frame_beats cycles per inference (the last frame partial)."""
    for divisor in (16, 64):
        arch = lean_arch(chips=2, link_bits_per_cycle=lean_arch().flit_bits // divisor)
        geometry = LinkGeometry(arch)
        for flits in (1, 4, 5, 1000):
            assert link_cycles(arch, flits) == geometry.frames(flits) * geometry.frame_beats
    fast = lean_arch(chips=2, link_bits_per_cycle=lean_arch().flit_bits)
    assert link_cycles(fast, 400) >= 400 + LinkGeometry(fast).frames(400)  # one flit a cycle in, plus the seals


def test_report_per_chip_and_per_link():
    model, calibration = cnn()
    # one copy: the automatic choice copies conv0 and pool0 here (two inferences fill the link's frames better)
    slow = _compile(model, calibration, SMALL.replace(chips=2, link_bits_per_cycle=1), replicas=1)
    text = report(slow)
    interval = estimated_interval(slow)
    assert f"estimated interval {interval} cycles/inference" in text
    assert "2 chips of 2x2 tiles" in text
    lines = text.splitlines()
    chip_header = next(i for i, line in enumerate(lines) if line.startswith("chip  tiles computing"))
    assert lines[chip_header + 2].split()[0] == "0" and lines[chip_header + 3].split()[0] == "1"
    link_row = next(line for line in lines if line.startswith("0 (chip 0 -> 1)"))
    flits = slow.links[0].inference_flits
    geometry = LinkGeometry(slow.arch)
    assert link_row.split()[5:8] == [str(flits), str(geometry.frames(flits)), str(link_cycles(slow.arch, flits))]
    assert "link bound on the interval" in text
    assert link_cycles(slow.arch, flits) > max(t.config.tile_period_cycles(8) for t in slow.tiles)
    assert "warning: link 0 (chip 0 -> chip 1) is the bottleneck" in text and "(bottleneck: link 0 (chip 0 -> chip 1))" in text
    fast = _compile(model, calibration, SMALL.replace(chips=2, link_bits_per_cycle=SMALL.flit_bits))
    assert "is the bottleneck" not in report(fast)
    single = report(_compile(*mlp([64, 32, 10]), SMALL))
    assert "link" not in single and "chip  tiles" not in single


def test_report_warns_when_a_link_is_the_bottleneck():
    """A 64 -> 8 -> 64 -> 10 MLP on two chips with a one-bit link: any cut carries a frame per inference, longer
    than every tile: the report says by how much."""
    model, calibration = mlp([64, 8, 64, 10])
    program = _compile(model, calibration, SMALL.replace(chips=2, link_bits_per_cycle=1))
    text = report(program)
    bound = link_cycles(program.arch, program.links[0].inference_flits)
    slowest_tile = max(t.config.tile_period_cycles(8) for t in program.tiles)
    assert bound > slowest_tile and estimated_interval(program) == bound
    per = "inference" if program.replicas == 1 else "program inference"   # copies count per program inference
    assert f"warning: link 0 (chip 0 -> chip 1) is the bottleneck: {bound} cycles/{per}, {bound / slowest_tile:.2f}x" in text


def test_impossible_partition_is_refused_in_one_line():
    model, calibration = mlp([64, 1024, 1024, 10])
    with pytest.raises(CompileError, match=r"does not fit 4 chips of 2x2 tiles .*there are 16 \(4 a chip\); "
                                           r"layer 'fc1'") as error:
        _compile(model, calibration, SMALL.replace(chips=4))
    assert "\n" not in str(error.value)
    with pytest.raises(CompileError, match=r"'sram_bytes'") as error:  # one layer no tile can hold, on any chips
        _compile(*mlp([4096, 16, 10]), SMALL.replace(chips=4, sram_bytes=4096))
    assert "\n" not in str(error.value)
    model, calibration = resnet()
    with pytest.raises(CompileError, match=r"10 layers but 2 chips of 2x2 tiles .* have 8 tiles"):
        _compile(model, calibration, SMALL.replace(chips=2))


def test_single_chip_programs_have_no_links_and_two_coordinate_places():
    model, calibration = mlp([64, 32, 10])
    program = _compile(model, calibration, SMALL)
    assert program.links == [] and all(t.chip == 0 for t in program.tiles)
    assert all(len(place) == 2 for layer in program.layers for place in layer.tiles)


def test_build_program_places_the_same_layers_on_any_chip_count():
    """The layers' slices are what they compute: on one chip or several, every layer's results are the same
    output ranges (only where they sit changes)."""
    model, calibration = cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = import_onnx(model, calibration=calibration)
    layers = lower_layers(imported.layers)
    for chips in (2, 4):
        program = build_program(layers, SMALL.replace(chips=chips), input_spec=imported.input,
                                output_spec=imported.output)
        check_system(program)


# --- emulated: N chips compute what one chip with all their tiles computes, at the estimated interval ---------------
@pytest.mark.parametrize("make, chips, bits", [(lambda: mlp([64, 64, 64, 8, 64, 64, 64, 10]), 2, 1),
                                               (lambda: mlp([64, 512, 10], seed=1), 4, None), (cnn, 2, None),
                                               (cnn, 4, 1), (resnet, 4, None)],
                         ids=["mlp-narrow-2", "mlp-split-4", "cnn-2", "cnn-4-slow", "resnet-4"])
def test_emulated_outputs_equal_one_big_chip(make, chips, bits):
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import emulate_model

    model, calibration = make()
    arch = SMALL.replace(chips=chips, link_bits_per_cycle=bits)
    program = _compile(model, calibration, arch)
    big = _compile(model, calibration, arch.replace(chips=1, cols=arch.cols * chips))
    x = np.resize(calibration, (12, *calibration.shape[1:]))
    emulated, alone = emulate_model(program, x), emulate_model(big, x)
    np.testing.assert_array_equal(emulated.q, alone.q)
    assert [stats.flits_per_inference for stats in emulated.result.links] == [l.inference_flits for l in program.links]
    # these programs' forward queues hold what their tiles forward, so the estimate is the emulated steady state
    assert all(t.config.queue_words >= t.config.queued_words for t in program.tiles)
    view, count = program.program_inferences(len(x))  # a replicated program: per program inference
    assert steady_state(view, emulated.result, count).interval == estimated_interval(program)


def test_emulated_interval_is_the_link_bound_when_the_link_is_the_bottleneck():
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import emulate_model

    model, calibration = cnn()
    # the automatic choice: two copies of conv0 and pool0, the rest shared (section 12's replicated stages), whose
    # two inferences fill the link's frames better than one; per program inference the link still binds
    program = _compile(model, calibration, SMALL.replace(chips=2, link_bits_per_cycle=1))
    bound = link_cycles(program.arch, program.links[0].inference_flits)
    assert bound > max(tile_program_estimate(t, 8) for t in program.tiles)
    x = np.resize(calibration, (12, *calibration.shape[1:]))
    view, count = program.program_inferences(len(x))
    assert steady_state(view, emulate_model(program, x).result, count).interval == bound


def test_no_chip_boundary_before_one_bank_tiles_the_link_would_starve():
    """A tile of one activation bank receives an inference only after its COMPUTE ends (section 4), so right behind a
    link its RECV runs at the link's pace: the placement refuses a chip boundary before such a layer when that
    alternation (COMPUTE, then every word the receiver did not buffer at the link's cycles a flit) exceeds the budget,
    and keeps it otherwise, or when the tile keeps two banks (its RECV overlaps COMPUTE)."""
    from flowtile.compiler.partition import (_NO_CUT, TileSlice, WindowCosts,
                                             _refuse_cuts_before_linked_single_banks)
    arch = lean_arch(chips=2, link_credit_frames=8, link_frame_flits=16)
    # a 1x1 convolution of 1024 -> 96 channels on a 3x3 map: 9 pixels x 96 outputs x 128 words = 110592 issue cycles
    costs = WindowCosts(k=1152, n_out=96, weight_words=96 * 128, row_issue=3 * 96 * 128, row_results=3 * 12,
                        out_height=3, channel_words=128, out_width=3, in_height=3, row_words=384)
    dense = TileSlice(0, 0, 8, 16, 0, False)

    def cut(single_bank: bool, budget: float, turns: int = 1) -> int:
        window = TileSlice(1, 0, 96, 1152, 0, False, 0, 9, 3, single_bank=single_bank)
        cycles = _refuse_cuts_before_linked_single_banks([0, 76896, 0], [0, 1152, 0], [[dense], [window]],
                                                         [None, costs], [1, turns], arch, budget)
        return cycles[1]

    # 110592 + 2 issue and drain cycles, then 1152 - 8 * 16 words at 76896 / 1152 = 66.75 cycles a flit: 178946
    assert cut(True, 178_900) == _NO_CUT
    assert cut(True, 179_000) == 76896
    assert cut(True, 300_000, turns=2) == _NO_CUT      # a layer of two turns alternates twice a program inference
    assert cut(False, 120_000) == 76896                # two banks: RECV overlaps COMPUTE, the link is a stage
