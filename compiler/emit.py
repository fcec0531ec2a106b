"""Program emission: partitioned, lowered layers -> a :class:`flowtile.program.Program`, and its report."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import onnx

from flowtile.arch import (OP_ADD, OP_BCAST, OP_CONCAT, OP_LANE, OP_MAC, OP_MAX, Arch,
                           dense_window_registers)
from flowtile.link_format import LinkGeometry, flit_lanes
from flowtile.program import LayerInfo, LinkProgram, Program, ProgramError, TileProgram, link_count, link_name
from flowtile.tile_config import TileConfig

from .errors import CompileError
from .lower import LoweredLayer, lane_params, lower_layers, pack_input_window, weight_rows
from .onnx_import import import_onnx, layer_sources
from .partition import TileSlice, band_input_rows, link_cycles, place_layers, queue_shortfall_cycles, words

__all__ = ["compile_model", "build_program", "report", "output_words", "StreamPlan", "plan_streams", "estimated_interval",
           "tile_estimate", "tile_program_estimate", "merge_contexts",
           "chip_macs", "replicate_layers"]


@dataclass(frozen=True)
class StreamPlan:
    """What the stream into one layer's tiles holds and what they do with it (docs/architecture.md 4.2).

    ``n_words``: RECV words per inference (every tensor in the stream); the tiles store words
    ``[store[0], store[1])`` (the layer's input, or both operands of an Add or Concat) and the layer's last
    tile forwards ``[forward[0], forward[1])`` (the tensors still needed later); ``operands``: for an Add or
    Concat, the stored-word offsets of its first and second ONNX input; ``tensors``: the stream's tensors in order,
    each ``(pixels, channels)`` (pixel-major, ``ceil(channels / L)`` words a pixel: what a link's lane table
    describes, :func:`flowtile.link_format.lane_segments_of_tensors`).
    """

    n_words: int
    store: tuple[int, int]
    forward: tuple[int, int]
    operands: tuple[int, int] = (0, 0)
    tensors: tuple[tuple[int, int], ...] = ()

    @property
    def carried(self) -> int:
        """Words received but not stored."""
        return self.n_words - (self.store[1] - self.store[0])


def replicate_layers(layers: list[LoweredLayer], replicas: int) -> list[LoweredLayer]:
    """``replicas`` copies of the layer chain, one after the other (alternate inferences, section 12): copy ``j``'s
    layers are named ``"<name> [copy j]"``, read source ``s + j * len(layers)`` for a layer ``s >= 0`` and stream
    tensor ``-1 - j`` (copy ``j``'s input) for the graph input, every one with explicit sources. One copy: the
    layers themselves."""
    if replicas == 1:
        return list(layers)
    n, sources = len(layers), layer_sources(layers)
    return [dataclasses.replace(layer, name=f"{layer.name} [copy {j}]",
                                sources=tuple(s + j * n if s >= 0 else -1 - j for s in reads))
            for j in range(replicas) for layer, reads in zip(layers, sources)]


def plan_streams(layers: list[LoweredLayer], lanes: int, in_words: int, replicas: int = 1,
                 in_shape: tuple[int, int] | None = None) -> list[StreamPlan]:
    """Which tensors ride in the stream into each layer, in chain order: the stream starts as the host input;
    each layer's last tile forwards the tensors a later layer still reads and appends its own output.

    ``replicas`` copies of a network (:func:`replicate_layers`): the stream starts as the copies' inputs (stream
    tensors ``-1, -2, ...``, ``in_words`` each) and ends as their last layers' outputs, in copy order; each copy's
    output rides to the end. ``in_shape``: the input's ``(pixels, channels)`` (:func:`lane_shape`; default one
    pixel of ``in_words * lanes`` channels, every lane used).

    A tensor's words are contiguous in the stream; a layer forwards one register range, from the first to the
    last tensor still needed after it (a tensor no longer needed between them rides along until it sits at an
    end); an Add's or Concat's two operands must be adjacent: CompileError otherwise. A Concat's first
    input must have a multiple of ``lanes`` channels (its words then end where the second input's begin).
    """
    sources = layer_sources(layers)
    copy_layers = len(layers) // replicas
    finals = [(j + 1) * copy_layers - 1 for j in range(replicas)]
    last_reader = {}
    for index, reads in enumerate(sources):
        for source in reads:
            last_reader[source] = index
    for final in finals[:-1]:  # an earlier copy's output rides in the stream to the host
        last_reader[final] = len(layers)
    names = {-1 - j: f"copy {j}'s graph input" for j in range(replicas)} if replicas > 1 else {}
    names = {-1: "the graph input", **names, **{i: f"layer '{layer.name}''s output" for i, layer in enumerate(layers)}}
    stream = [(-1 - j, in_words) for j in range(replicas)]
    shapes = {-1 - j: in_shape or (1, in_words * lanes) for j in range(replicas)}
    plans = []
    for index, (layer, reads) in enumerate(zip(layers, sources)):
        offsets = np.cumsum([0] + [n for _, n in stream])
        where = {tensor: position for position, (tensor, _) in enumerate(stream)}
        missing = [source for source in reads if source not in where]
        assert not missing, f"layer {index} reads tensors {missing} that are not in the stream"
        positions = sorted(where[source] for source in reads)
        if layer.is_join and (len(set(reads)) != 2 or positions[1] != positions[0] + 1):
            raise CompileError(f"layer '{layer.name}' ({layer.op}) joins {names[reads[0]]} and {names[reads[1]]}, "
                               f"which are not two adjacent tensors of the stream")
        if layer.is_concat and layer.concat_channels_a % lanes:
            raise CompileError(f"layer '{layer.name}' (Concat): its first input has {layer.concat_channels_a} channels, "
                               f"not a multiple of the {lanes} lanes (arch field 'lanes'), so the second input's "
                               f"channels would not start at a word boundary")
        store = (int(offsets[positions[0]]), int(offsets[positions[-1] + 1]))
        live = [position for position, (tensor, _) in enumerate(stream) if last_reader.get(tensor, -1) > index]
        # a tile forwards one contiguous range: a tensor no longer needed between two that are rides along (e.g. a
        # residual block's input between another copy's input and the shortcut's output) and is dropped by the
        # first layer after which it sits at an end of the live range
        live = list(range(live[0], live[-1] + 1)) if live else []
        forward = (int(offsets[live[0]]), int(offsets[live[-1] + 1])) if live else (0, 0)
        operands = tuple(int(offsets[where[source]]) - store[0] for source in reads) if layer.is_join else (0, 0)
        plans.append(StreamPlan(int(offsets[-1]), store, forward, operands,
                                tuple(shapes[tensor] for tensor, _ in stream)))
        stream = [stream[p] for p in live] + [(index, output_words(layer, lanes))]
        shapes[index] = output_shape(layer)
    assert [tensor for tensor, _ in stream] == finals, "tensors left in the stream after the last layer"
    return plans


def _first_stored_word(config: TileConfig, n_words: int) -> int:
    """The first RECV word a tile stores (either store range), ``n_words`` if it stores none."""
    begins = [begin for begin, end in ((config.store_begin, config.store_end), (config.store2_begin, config.store2_end))
              if end > begin]
    return min(begins, default=n_words)


def forward_only_what_follows(configs: list[TileConfig], plan: StreamPlan) -> list[TileConfig]:
    """The registers of one layer's tiles (chain order; each built to receive the whole stream of ``plan``, a tile
    with tiles of its layer after it forwarding all of it) rewritten so that each tile forwards only the stream's
    suffix from the first word a later tile of the layer stores or the layer's last tile forwards (``plan.forward``,
    the tensors still needed later). A band of output rows reads only its rows: the rows above the next band's
    windows end their journey there, so they cost the later tiles no RECV cycle and no queue slot (section 4.2's
    forward range; a forward range is one contiguous run of words, so the stream is cut only at its front). Tile
    ``t`` then receives words ``[g_t, n_words)`` of the layer's stream and its store and forward ranges count from
    ``g_t``."""
    n_words = plan.n_words
    live = plan.forward if plan.forward[1] > plan.forward[0] else None
    starts = [0] * len(configs)
    need = live[0] if live else n_words
    for t in range(len(configs) - 1, 0, -1):
        need = min(need, _first_stored_word(configs[t], n_words))
        starts[t] = need
    trimmed = []
    for t, (config, start) in enumerate(zip(configs, starts)):
        if t + 1 < len(configs):
            forward = (starts[t + 1] - start, n_words - start)
        else:
            forward = (live[0] - start, live[1] - start) if live else (0, 0)
        ranges = {}
        for begin, end in (("store_begin", "store_end"), ("store2_begin", "store2_end")):
            if getattr(config, end) > getattr(config, begin):
                ranges.update({begin: getattr(config, begin) - start, end: getattr(config, end) - start})
        assert config.n_in_words == n_words and all(value >= 0 for value in ranges.values())
        trimmed.append(config.replace(n_in_words=n_words - start, forward_begin=forward[0], forward_end=forward[1],
                                      **ranges))
    return trimmed


def _config(**values: int) -> TileConfig:
    """A full register set: every CONFIG_FIELDS register, zero unless given (an idle tile), clamps -128..127."""
    return TileConfig(**{"clamp_lo": -128, "clamp_hi": 127, **values})


def _destination(arch: Arch, position: int) -> dict[str, int]:
    """Every tile sends to the next position of the system chain. A chip's last chain tile sends to its host
    output port: the last chip's to the host (as on one chip), with its own place as the destination; the others'
    into link ``k``, addressed to tile (0, 0) of chip ``k + 1``, where the link delivers them (only their data
    crosses; the receiver addresses every flit to that tile; section 12)."""
    chip, within = divmod(position, arch.n_tiles)
    if within == arch.n_tiles - 1:
        row, col = arch.chain_position(within) if chip == arch.chips - 1 else arch.chain_position(0)
        return {"dest_row": row, "dest_col": col, "dest_host": 1}
    row, col = arch.chain_position(within + 1)
    return {"dest_row": row, "dest_col": col, "dest_host": 0}


def _tile(arch: Arch, position: int, config: TileConfig, sram: np.ndarray, params: np.ndarray) -> TileProgram:
    """A tile at ``position`` of the system chain (``arch.system_position``)."""
    chip, row, col = arch.system_position(position)
    return TileProgram(row, col, config, sram, params, chip=chip)


def _stream_registers(plan: StreamPlan, part: TileSlice) -> dict[str, int]:
    """RECV registers (section 4.2) of a tile receiving the layer's whole stream: it stores the layer's input; a tile
    with more tiles of its layer after it forwards the whole stream, the layer's last tile only the tensors still
    needed later (:func:`forward_only_what_follows` then trims the later tiles' streams)."""
    forward = (0, plan.n_words) if part.forward else plan.forward
    return {"n_in_words": plan.n_words, "store_begin": plan.store[0], "store_end": plan.store[1],
            "forward_begin": forward[0], "forward_end": forward[1]}


def _compute_tile(arch: Arch, position: int, layer: LoweredLayer, part: TileSlice, plan: StreamPlan) -> TileProgram:
    if layer.is_join:
        return _join_tile(arch, position, layer, part, plan)
    if layer.window is not None:
        return _window_tile(arch, position, layer, part, plan)
    k, lanes = part.n_in_words, arch.lanes
    rows = weight_rows(layer, lanes)[part.start:part.stop]  # [n_out, K * lanes], zero-padded / permuted
    assert rows.shape[1] == k * lanes
    config = _config(**_stream_registers(plan, part), n_pass=part.n_pass, n_out=part.n_out,
                     w_base=0, act_base=part.n_out * k, zp_out=layer.zp_out, clamp_lo=layer.clamp_lo,
                     clamp_hi=layer.clamp_hi, **dense_window_registers(k), **_destination(arch, position))
    return _tile(arch, position, config, rows.reshape(part.n_out * k, lanes), layer.params[part.start:part.stop].copy())


def _join_tile(arch: Arch, position: int, layer: LoweredLayer, part: TileSlice, plan: StreamPlan) -> TileProgram:
    """A band of output pixels of a residual Add (op ADD, section 4.2) or channel Concat (op CONCAT, section 4.3):
    no weights; the operands where the stream put them. A band of fewer than all rows stores only its rows of each
    operand map: the earlier operand's in the first store range, the later's in the second, so the band is a map of
    its own (``in_height`` = its rows, ``out_row_begin = 0``) with operand offsets 0 and the first range's size."""
    lanes, w = arch.lanes, layer.window
    cw = words(w.channels, lanes)
    words_a = layer.concat_channels_a // lanes if layer.is_concat else 0
    group = _word_group(layer, part, lanes, cw)
    stream, height, row_begin, operands = _stream_registers(plan, part), w.height, part.row_begin, plan.operands
    if part.rows < w.height:
        # (first stored word, words) of the band's rows of operand a and of operand b
        a, b = ((plan.store[0] + offset + part.row_begin * w.width * pixel_words, part.rows * w.width * pixel_words)
                for offset, pixel_words in zip(operands, (words_a or cw, cw - words_a)))
        (first, size), (second, size2) = sorted((a, b))
        stream.update(store_begin=first, store_end=first + size, store2_begin=second, store2_end=second + size2)
        operands = (0, size) if a[0] < b[0] else (size, 0)
        height, row_begin = part.rows, 0
    config = _config(
        **stream, n_pass=part.n_pass, n_out=part.n_out, w_base=0, act_base=0,
        zp_out=layer.zp_out, clamp_lo=layer.clamp_lo, clamp_hi=layer.clamp_hi, **group,
        op=OP_ADD if layer.is_add else OP_CONCAT, in_height=height, in_width=w.width, words_per_pixel=cw,
        kernel_h=1, kernel_w=2 if layer.is_add else 1, stride=1, out_row_begin=row_begin, out_rows=part.rows,
        out_col_begin=part.col_begin, out_col_end=part.col_end,
        out_width=w.width, operand_a_offset=operands[0], operand_b_offset=operands[1],
        add_mult_a=layer.add_mult[0], add_mult_b=layer.add_mult[1],
        concat_words_a=words_a, **_destination(arch, position))
    return _tile(arch, position, config, np.zeros((0, lanes), np.int8),
                 lane_params(layer, lanes)[part.start:part.stop].copy())


def _word_group(layer: LoweredLayer, part: TileSlice, lanes: int, cw: int) -> dict[str, int]:
    """The channel-group registers of a per-word op's tile (MaxPool, lane layer, Add; section 4.4): none when it
    computes every word of a pixel, else its words ``[start / L, stop / L)`` and the earlier groups' words a
    pixel, which it passes before its own."""
    if part.n_out == cw * lanes:
        assert part.start == 0
        return {}
    assert part.start % lanes == 0 and part.n_out % lanes == 0 and not layer.is_concat
    return {"group_word_begin": part.start // lanes, "group_words": part.n_out // lanes,
            "pass_per_pixel": part.pass_per_pixel}


def _window_tile(arch: Arch, position: int, layer: LoweredLayer, part: TileSlice, plan: StreamPlan) -> TileProgram:
    """A band of output pixels of a Conv/MaxPool/lane layer (section 4.1), of a channel group of a Conv (section 4.4):
    its weights from word 0, behind them (two banks) only the input rows the windows of its output rows read. The registers
    describe the band as a map of its own: ``in_height`` = the stored rows, ``out_row_begin = 0``, and ``pad_top``
    shifted so that output row 0's windows start where the global ones do (zero for every band below the top
    padding: its first stored row is its first window row)."""
    lanes, w = arch.lanes, layer.window
    cw = words(w.channels, lanes)
    first_row, stored_rows = band_input_rows(w, part.row_begin, part.rows)
    row_words = w.width * cw
    stream = _stream_registers(plan, part)
    stream.update(store_begin=plan.store[0] + first_row * row_words,
                  store_end=plan.store[0] + (first_row + stored_rows) * row_words)
    weights = weight_rows(layer, lanes)  # [N_o, K_w * lanes]; [CW*L, 0] for MaxPool; [CW*KH*KW, L] for LANE
    extra = {}
    if layer.broadcasts(lanes):  # output words [start / L, stop / L) of every pixel (sections 4.4, 4.5)
        issues = w.kernel_h * w.kernel_w * w.channels
        weights = weights[part.start // lanes * issues:part.stop // lanes * issues]
        op, params, n_out = OP_BCAST, layer.params[part.start:part.stop].copy(), part.n_out
        extra = {"in_channels": w.channels, "group_words": part.n_out // lanes, "pass_per_pixel": part.pass_per_pixel}
        if layer.dense_input:  # its rows' bytes, from the word holding the first one (section 4.5)
            row_bytes = w.width * w.channels
            begin, end = first_row * row_bytes, (first_row + stored_rows) * row_bytes
            stream.update(store_begin=plan.store[0] + begin // lanes, store_end=plan.store[0] + -(-end // lanes))
            extra.update(in_dense=1, in_dense_offset=begin % lanes)
    elif layer.is_lane or layer.is_pool:  # all the words of a pixel, or one channel group of them (section 4.4)
        extra = _word_group(layer, part, lanes, cw)
        n_out = part.n_out
        if layer.is_lane:
            window = w.kernel_h * w.kernel_w
            weights = weights[part.start // lanes * window:part.stop // lanes * window]
            op, params = OP_LANE, lane_params(layer, lanes)[part.start:part.stop].copy()
        else:
            op, params = OP_MAX, np.zeros((n_out, 3), np.int64)  # MAX reads no parameters: zero rows
    else:  # a convolution: all its output channels, or one group of them (section 4.4)
        weights, params = weights[part.start:part.stop], layer.params[part.start:part.stop].copy()
        n_out, op = weights.shape[0], OP_MAC
        extra = {"pass_per_pixel": part.pass_per_pixel}
    assert n_out == part.n_out
    sram = weights.reshape(-1, lanes) if weights.size else np.zeros((0, lanes), np.int8)
    config = _config(
        **stream, n_pass=part.n_pass, n_out=n_out, w_base=0,
        act_base=sram.shape[0], zp_out=layer.zp_out, clamp_lo=layer.clamp_lo, clamp_hi=layer.clamp_hi,
        op=op, in_height=stored_rows, in_width=w.width,
        words_per_pixel=cw, kernel_h=w.kernel_h, kernel_w=w.kernel_w, stride=w.stride,
        pad_top=w.pad_top - part.row_begin * w.stride + first_row, pad_left=w.pad_left,
        pad_value=layer.pad_value, out_row_begin=0, out_rows=part.rows, out_col_begin=part.col_begin,
        out_col_end=part.col_end, out_width=w.out_width, single_bank=int(part.single_bank), **extra,
        **_line_buffer(part), **_destination(arch, position))
    assert config.weight_words == sram.shape[0]
    return _tile(arch, position, config, sram, params)


def _line_buffer(part: TileSlice) -> dict[str, int]:
    """A streaming group's line buffer (section 4 "Streaming rows"): ``stream_rows``, and with its layer split into
    channel groups the rows interleaved in the streams between them (one group: nothing passes or follows)."""
    if not part.stream_rows:
        return {}
    return {"stream_rows": part.stream_rows,
            "interleave_rows": int(bool(part.forward or part.pass_per_pixel))}


def _layer_info(layer: LoweredLayer, tiles: tuple, contexts: tuple = ()) -> LayerInfo:
    """Report-only sizes: input and output elements and the useful MACs (a MaxPool has none; a Conv has
    ``C*KH*KW / groups`` per output element, a lane layer (depthwise Conv, average pools) ``KH*KW``, border positions
    included)."""
    if layer.window is None:
        return LayerInfo(layer.name, layer.op, layer.n_in, layer.n_out, tiles, layer.relu, contexts=contexts)
    w = layer.window
    outputs = layer.n_out * w.out_height * w.out_width
    if layer.is_pool or layer.is_join:
        macs = 0
    elif layer.is_lane:
        macs = outputs * w.kernel_h * w.kernel_w
    else:
        macs = outputs * (w.channels // layer.groups) * w.kernel_h * w.kernel_w
    return LayerInfo(layer.name, layer.op, w.channels * w.height * w.width, outputs, tiles, layer.relu, macs, contexts)


def output_words(layer: LoweredLayer, lanes: int) -> int:
    """Flits one inference's output of ``layer`` takes (pixel-major maps: ``OH*OW*N_r``)."""
    if layer.window is None:
        return words(layer.n_out, lanes)
    return layer.window.out_height * layer.window.out_width * words(layer.n_out, lanes)


def output_shape(layer: LoweredLayer) -> tuple[int, int]:
    """``(pixels, channels)`` of ``layer``'s output in the stream (:func:`output_words` = ``pixels * ceil(channels /
    L)``)."""
    if layer.window is None:
        return 1, layer.n_out
    return layer.window.out_height * layer.window.out_width, layer.n_out


def lane_shape(spec, lanes: int) -> tuple[int, int]:
    """``(pixels, channels)`` of a host tensor (:class:`flowtile.program.TensorSpec`) as it travels: its
    ``words(L) = pixels * ceil(channels / L)``, channel ``c`` of a pixel in word ``c // L``, lane ``c % L`` (a
    dense map: its words as pixels of ``L`` channels)."""
    if spec.layout == "chw":
        channels, height, width = spec.shape
        return height * width, channels
    if spec.layout == "im2col":
        kernel_h, kernel_w, _, _, _, out_height, out_width = spec.window
        return out_height * out_width, kernel_h * kernel_w * spec.shape[0]
    if spec.layout == "tc":
        steps, channels = spec.shape
        return steps, channels
    if spec.layout == "dense":  # every lane carries a value: words of L channels
        return spec.words(lanes), lanes
    return 1, spec.length


def _pass_tile(arch: Arch, position: int, n_pass: int) -> TileProgram:
    return _tile(arch, position, _config(n_pass=n_pass, **_destination(arch, position)),
                 np.zeros((0, arch.lanes), np.int8), np.zeros((0, 3), np.int64))


def _tile_place(arch: Arch, position: int) -> tuple[int, ...]:
    """A tile's place in :attr:`LayerInfo.tiles`: ``(row, col)`` on one chip, ``(chip, row, col)`` on several."""
    place = arch.system_position(position)
    return place[1:] if arch.chips == 1 else place


def dense_graph_input(layers: list[LoweredLayer], input_spec, lanes: int) -> tuple[list[LoweredLayer], object]:
    """The graph input in layout "dense" (section 4.5) when every layer reading it runs as op BCAST: its
    ``ceil(C*H*W / L)`` words instead of ``H*W*ceil(C / L)`` (3/8 for an RGB image on 8 lanes, 1/8 for one channel)
    on the host link, through every tile that passes it and on chip links, at the same COMPUTE cost. Else
    unchanged."""
    if input_spec.layout != "chw":
        return layers, input_spec
    readers = [index for index, reads in enumerate(layer_sources(layers)) if -1 in reads]
    if not readers or not all(layers[index].broadcasts(lanes) for index in readers):
        return layers, input_spec
    dense = [dataclasses.replace(layer, dense_input=True) if index in readers else layer
             for index, layer in enumerate(layers)]
    return dense, dataclasses.replace(input_spec, layout="dense")


def stage_chain(layers: list[LoweredLayer], lanes: int, in_words: int, in_shape: tuple[int, int], replicas: int,
                stage: tuple[int, int]) -> tuple[list[LoweredLayer], list[StreamPlan], list[int]]:
    """The chain of a program whose layers ``stage = (a, b)`` (``layers[a:b]``) are replicated ``replicas`` times
    and whose other layers every copy shares (docs/architecture.md section 12, replicated stages): the layers before
    the stage, then the stage's copies one after the other (:func:`replicate_layers`, copy ``j`` taking inference
    ``j`` of every program inference), then the layers after it; with each chain layer's stream plan and turns (the
    shared layers run once per copy: ``replicas`` turns, on one copy's stream each; a copy's layers once). The stream
    into the stage and the one out of it must hold one tensor each (the stage's input, its output), so that the
    copies' streams are those tensors side by side; CompileError otherwise."""
    n = len(layers)
    a, b = stage
    if not 0 <= a < b <= n or (a, b) == (0, n):
        raise CompileError(f"a replicated stage is layers [first, end) with 0 <= first < end <= {n}, not the whole "
                           f"network (replicas copy it all); got [{a}, {b})")
    single = plan_streams(layers, lanes, in_words, 1, in_shape)
    for index, where in ((a, "into"), (b, "out of")):
        if not _one_tensor_cut(single, index):
            raise CompileError(f"replicated stage [{a}, {b}): the stream {where} it, before layer "
                               f"'{layers[index].name}', holds {len(single[index].tensors)} tensors (a skip connection "
                               f"crosses it); a stage begins and ends where the stream holds one tensor")
    sources = layer_sources(layers)
    inside = []
    for layer, reads in zip(layers[a:b], sources[a:b]):
        assert all(source >= a - 1 for source in reads), "one tensor into the stage: it reads only the one before"
        inside.append(dataclasses.replace(layer, sources=tuple(source - a if source >= a else -1 for source in reads)))
    copies = replicate_layers(inside, replicas)
    into = single[a]
    stage_plans = plan_streams(copies, lanes, into.n_words, replicas, into.tensors[0])
    chain = list(layers[:a]) + copies + list(layers[b:])
    plans = single[:a] + stage_plans + single[b:]
    turns = [replicas] * a + [1] * len(copies) + [replicas] * (n - b)
    return chain, plans, turns


def _one_tensor_cut(plans: list[StreamPlan], index: int) -> bool:
    """Whether the stream before layer ``index`` (after the last layer: the output) holds one tensor, where a
    replicated stage may begin or end (:func:`stage_chain`)."""
    return index == len(plans) or len(plans[index].tensors) == 1


def build_program(layers: list[LoweredLayer], arch: Arch, *, input_spec, output_spec, model_name: str = "",
                  replicas: int = 1, stage: tuple[int, int] | None = None) -> Program:
    """Partition lowered layers over the (system) chain and emit every tile's registers, SRAM image and parameters,
    and on several chips the links' registers (in a ring, ``arch.chip_topology = "ring"``, also the return link's,
    which carries the output stream from the last chip to the host at chip 0). Tiles that compute nothing pass their
    stream on: a chip's tiles after its last slice (the next chip starts at a narrow cut,
    :func:`compiler.partition.place_layers`) and the last chip's tiles after the last layer.

    ``replicas``: copies of the network on the chain (:func:`replicate_layers`), taking alternate inferences: a
    program inference is ``replicas`` real ones, their inputs and outputs back to back in the stream. ``stage``:
    ``(a, b)``, copy only ``layers[a:b]`` and let every copy share the other layers, whose tiles run once per copy
    (:func:`stage_chain`, section 12)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise CompileError(f"replicas must be a positive integer (copies of the network), got {replicas!r}")
    layers, input_spec = dense_graph_input(layers, input_spec, arch.lanes)
    in_words = input_spec.words(arch.lanes)
    if stage is not None:
        if replicas < 2:
            raise CompileError(f"a replicated stage needs at least 2 copies (replicas), got {replicas}")
        layers, plans, turns = stage_chain(layers, arch.lanes, in_words, lane_shape(input_spec, arch.lanes), replicas,
                                           stage)
    else:
        layers = replicate_layers(layers, replicas)
        plans = plan_streams(layers, arch.lanes, in_words, replicas, lane_shape(input_spec, arch.lanes))
        turns = [1] * len(layers)
    # per turn of each layer (a layer every copy shares takes one copy's stream a turn), then the last layer's output
    last_copies = replicas if turns[-1] == 1 else 1
    stream_words = [plan.n_words for plan in plans] + [last_copies * output_words(layers[-1], arch.lanes)]
    stream_tensors = [plan.tensors for plan in plans] + [(output_shape(layers[-1]),) * last_copies]
    # one chip: the partition costs each band with the stream it receives (forward_only_what_follows); on several
    # chips a layer cut by a chip boundary keeps whole streams, so every tile is costed with the whole stream
    fronts = ([(plan.store[0], plan.forward[0] if plan.forward[1] > plan.forward[0] else plan.n_words)
               for plan in plans] if arch.chips == 1 else None)
    placement = place_layers(layers, arch, [plan.carried for plan in plans], stream_words, stream_tensors, fronts,
                             [plan.forward[1] - plan.forward[0] for plan in plans], turns)
    contexts: dict[int, list[TileProgram]] = {}   # per position, the tiles of its contexts in turn order
    infos: list[LayerInfo] = []
    for layer, slices, plan, places, layer_turns in zip(layers, placement.splits, plans, placement.places(arch), turns):
        layer_tiles = [_compute_tile(arch, position, layer, part, plan) for (position, _), part in zip(places, slices)]
        for tile in layer_tiles:
            tile.turns = layer_turns
        if len({position // arch.n_tiles for position, _ in places}) == 1:
            # a layer cut by a chip boundary keeps whole streams: a link carries what the placement counted
            for tile, config in zip(layer_tiles, forward_only_what_follows([tile.config for tile in layer_tiles], plan)):
                tile.config = config
        for (position, context), tile in zip(places, layer_tiles):
            contexts.setdefault(position, []).append(tile)
            assert len(contexts[position]) == context + 1
        infos.append(dataclasses.replace(_layer_info(layer, tuple(_tile_place(arch, position) for position, _ in places),
                                                     tuple(context for _, context in places)), turns=layer_turns))
    tiles: list[TileProgram | None] = [None] * arch.system_tiles
    for position, parts in contexts.items():
        tiles[position] = parts[0] if len(parts) == 1 else merge_contexts(arch, parts)
    for position in range(arch.system_tiles):
        if tiles[position] is None:  # pass on what the tile before emits (the host input at position 0)
            before = tiles[position - 1] if position else None
            n_pass = before.turns * before.output_config.output_flits(arch.lanes) if before else replicas * in_words
            tiles[position] = _pass_tile(arch, position, n_pass)
    _check_routes(tiles, arch)
    # every tile's forward queue: all the SRAM its weights and banks leave free (partition reserves some); a tile of
    # several contexts got its queues from merge_contexts
    for tile in tiles:
        if tile.config.queued_words and not tile.later_contexts:
            tile.config = tile.config.with_queue(arch)
    # link k leaves chip k's exit tile; a ring's last link (chips - 1) carries the last chip's output to the host
    exits = [tiles[(chip + 1) * arch.n_tiles - 1] for chip in range(link_count(arch))]
    links = [LinkProgram(tile.turns * tile.output_config.output_flits(arch.lanes), segments)
             for tile, segments in zip(exits, placement.link_segments)]
    assert tuple(link.inference_flits for link in links) == placement.link_words
    program = Program(arch=arch, input=input_spec, output=output_spec, layers=infos, tiles=tiles,
                      model_name=model_name, links=links, replicas=replicas)
    try:
        program.validate()
    except ProgramError as error:  # e.g. a stream longer than a register counts (many copies of a large input)
        copies = f" with {replicas} copies of the network" if replicas > 1 else ""
        raise CompileError(f"the program{copies} does not fit the registers: {error}") from None
    return program


def merge_contexts(arch: Arch, parts: list[TileProgram]) -> TileProgram:
    """One tile running ``parts`` (tiles as emitted for one position each, in chain order) in turn as its contexts
    (docs/architecture.md section 4.6). Each part's data (weights from its word 0, then its two activation banks) moves
    behind the previous part's, its parameter rows behind the previous part's rows (``param_base``); every context
    but the last sends into the loop-back FIFO (``loop_back = 1``, destination registers 0); contexts after the
    first get a forward queue of exactly what they forward and pass per inference (what keeps the loop-back from
    deadlocking), behind all the data, and context 0 every SRAM word left. CompileError if they do not fit."""
    lanes = arch.lanes
    configs, offset, rows = [], 0, 0
    images, tables = [], []
    for index, part in enumerate(parts):
        c = part.config
        assert c.w_base == 0 and c.n_out and not c.queue_words, "merge_contexts takes tiles as emitted"
        last = index == len(parts) - 1
        moved = c.replace(w_base=offset, act_base=c.act_base + offset, param_base=rows, loop_back=int(not last),
                          **({} if last else {"dest_row": 0, "dest_col": 0, "dest_host": 0}))
        configs.append(moved)
        images.append((offset, part.sram))
        tables.append(part.params)
        offset += c.data_end
        rows += c.n_out
    for index in range(1, len(configs)):
        queued = configs[index].queued_words
        configs[index] = configs[index].replace(queue_base=offset if queued else 0, queue_words=queued)
        offset += queued
    if offset > arch.sram_words or (configs[0].queued_words and offset >= arch.sram_words):
        raise CompileError(f"tile {parts[0].key}: its {len(parts)} contexts need {offset} SRAM words and a forward "
                           f"queue, the tile has {arch.sram_words} (arch field 'sram_bytes' = {arch.sram_bytes})")
    if configs[0].queued_words:
        configs[0] = configs[0].replace(queue_base=offset, queue_words=arch.sram_words - offset)
    end = max(base + image.shape[0] for base, image in images)
    sram = np.zeros((end, lanes), np.int8)
    for base, image in images:
        sram[base:base + image.shape[0]] = image
    first = parts[0]
    return TileProgram(first.row, first.col, configs[0], sram, np.concatenate(tables), chip=first.chip,
                       later_contexts=tuple(configs[1:]))


def _check_routes(tiles: list[TileProgram], arch: Arch) -> None:
    """Every stream is one hop between chain neighbours of a chip, or into its exit port (section 1): the last
    chip's to the host, the others' into their link, addressed to tile (0, 0) of the next chip (the first tile of
    its chain, where the link delivers). So each mesh link carries exactly one stream and no router output is
    contended: what makes section 6's timing exact."""
    for position, tile in enumerate(tiles):
        c = tile.output_config
        chip, within = divmod(position, arch.n_tiles)
        if within == arch.n_tiles - 1:
            assert c.dest_host, f"tile {tile.key} ends chip {chip}'s chain but does not send to its exit port"
            if chip < arch.chips - 1:
                assert (c.dest_row, c.dest_col) == arch.chain_position(0) == (0, 0), \
                    f"tile {tile.key} sends over link {chip} to ({c.dest_row},{c.dest_col}), not to tile (0,0)"
            continue
        assert not c.dest_host, f"tile {tile.key} sends to the host port before its chip's chain ends"
        hops = abs(c.dest_row - tile.row) + abs(c.dest_col - tile.col)
        assert hops == 1 and (c.dest_row, c.dest_col) == arch.chain_position(within + 1), \
            f"tile {tile.key} sends to ({c.dest_row},{c.dest_col}), not its chain successor"


def compile_model(model: str | os.PathLike | onnx.ModelProto, arch: Arch, *, calibration: np.ndarray | None = None,
                  per_channel: bool = True, pack_input: bool = True, replicas: int | None = None,
                  stage: tuple[str, str] | None = None) -> Program:
    """Compile an ONNX MLP or small CNN (int8 QDQ, or float: quantized first) for ``arch``.

    ``calibration`` (``[n, *input shape]`` float) and ``per_channel`` only matter for float models.
    ``pack_input``: let the host pack the first convolution's window into channels
    (:func:`compiler.lower.pack_input_window`) when the packed program fits and its estimated interval is
    shorter (on a tie the plain input wins: fewer words on the host link; op BCAST, section 4.5, already runs a
    convolution over few channels at the packed rate).
    ``replicas``: copies of the network on the chain, taking alternate inferences (:func:`replicate_layers`);
    None: the ``N`` in ``1 .. max_copies(...)`` (:func:`max_copies`: up to one a chip on several chips, up to
    :data:`ONE_CHIP_COPIES` on one chip large enough, up to :data:`SMALL_CHIP_COPIES` on a small one of several
    contexts a tile) that fits with the shortest estimated interval per real
    inference (the interval per program inference over ``N``; the fewest copies on a tie); on several chips, where
    one copy is best, also two copies of the slowest chip's layers and of the chip's doing the most work
    (:func:`busiest_chip_stages`), the fastest kept if faster.
    ``stage``: ``(first, last)`` layer names (as the report names them): copy only those layers and what lies
    between, ``replicas`` times (default 2), and let the copies share the layers before and after them, whose
    tiles run once per copy (docs/architecture.md section 12, replicated stages; :func:`stage_chain`).
    Raises :class:`compiler.CompileError` when the model is unsupported or does not fit.
    """
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
        raise CompileError(f"replicas must be a positive integer (copies of the network), got {replicas!r}")
    imported = import_onnx(model, calibration=calibration, per_channel=per_channel)
    layers = lower_layers(imported.layers)
    if stage is not None:
        return _compile_copies(layers, imported, arch, pack_input, replicas or 2, _stage_range(layers, stage))
    most = max_copies(arch, len(layers))
    if replicas is not None or most == 1:
        return _compile_copies(layers, imported, arch, pack_input, replicas or 1)
    best, first_error = None, None
    for copies in range(1, most + 1):
        try:
            program = _compile_copies(layers, imported, arch, pack_input, copies)
        except CompileError as error:
            first_error = first_error or error
            continue
        if best is None or _faster(program, best):
            best = program
    if best is None:
        raise first_error
    if arch.chips > 1 and best.replicas == 1:   # no copy of the whole network helps: try copying a busy chip's layers
        one_copy = best
        for stage in busiest_chip_stages(one_copy, layers, imported.input, arch.lanes):
            try:
                program = _compile_copies(layers, imported, arch, pack_input, 2, stage)
            except CompileError:
                continue
            if _faster(program, best):
                best = program
    return best


def _faster(program: Program, than: Program) -> bool:
    """Whether ``program``'s estimated interval per real inference (per program inference over its copies) is
    shorter than ``than``'s."""
    return estimated_interval(program) * than.replicas < estimated_interval(than) * program.replicas


def busiest_chip_stages(program: Program, layers: list[LoweredLayer], input_spec,
                        lanes: int) -> list[tuple[int, int]]:
    """The stages (section 12) :func:`compile_model` tries to copy on several chips when no copy of the whole network
    helps, each the layers with a tile on one chip of the one-copy ``program``, widened to the nearest points where
    the stream holds one tensor (:func:`stage_chain`), the whole network left out: the chip whose slowest tile is
    slowest, then the chip doing the most MACs an inference if that is another stage. Both, because the placement
    spreads every chip's layers to the one budget, so the slowest tiles of several chips are often within a few cycles
    of each other: a narrow-waisted MLP on 2 chips of 3x3 tiles gains from copying its first chip's layers (the slowest
    by a tie), MobileNetV1-1.0 on 4 chips of 8x8 at 1/64 from copying chip 1's 6x6x512 stage (45 % more MACs than chip
    0, whose layers, the slowest tile being the budget, do not fit twice)."""
    arch = program.arch
    slowest = [0] * arch.chips
    for tile in program.tiles:
        slowest[tile.chip] = max(slowest[tile.chip], tile_program_estimate(tile, lanes))
    macs = chip_macs(program)
    dense, spec = dense_graph_input(layers, input_spec, lanes)
    plans = plan_streams(dense, lanes, spec.words(lanes), 1, lane_shape(spec, lanes))
    stages = []
    for chip in (max(range(arch.chips), key=slowest.__getitem__), max(range(arch.chips), key=macs.__getitem__)):
        on_chip = [index for index, layer in enumerate(program.layers)
                   if any((place[0] if len(place) == 3 else 0) == chip for place in layer.tiles)]
        if not on_chip:
            continue
        a, b = on_chip[0], on_chip[-1] + 1
        while not _one_tensor_cut(plans, a):   # the stream into layer 0 is the input: one tensor
            a -= 1
        while not _one_tensor_cut(plans, b):
            b += 1
        if (a, b) != (0, len(layers)) and (a, b) not in stages:
            stages.append((a, b))
    return stages


#: The most copies of a network :func:`compile_model` tries on one chip, and the tiles a layer each copy must have
#: at least (:func:`max_copies`). A copy takes alternate inferences on its own share of the tiles: where one copy
#: cannot use a large grid (layers that split no further, the balance's granularity), several do (the FC autoencoder
#: on 12x12: 642 -> 321 cycles an inference with 2 copies, measured; DS-CNN on 32x8 tiles of 64 KiB: 1976 -> 1409,
#: estimated). On smaller grids a copy would have too few tiles to gain.
ONE_CHIP_COPIES = 4
ONE_CHIP_TILES_PER_LAYER = 2
#: One chip's tiles below which copies are not tried when a tile holds one layer (4x4 and such: a copy would have too
#: few tiles to gain; trying them chose copies for 2-layer MLPs, which gain little and lose the one-copy layout the
#: small tests and demos show).
ONE_CHIP_MIN_TILES = 64
#: The most copies tried on a chip below :data:`ONE_CHIP_MIN_TILES` whose tiles hold several layers (contexts): there
#: a copy of a small network needs only a few tiles, and several copies fill the gaps the balance's granularity leaves
#: in one (the digits CNN on 4x4 tiles of 4 contexts: one copy 218 cycles an inference, 5 copies 202, 91.6 % of the
#: MAC bound, measured = estimated; its second convolution comes in units of 72 cycles).
SMALL_CHIP_COPIES = 8


def max_copies(arch: Arch, n_layers: int) -> int:
    """Copies :func:`compile_model` tries: on several chips up to one a chip; on one chip of at least
    :data:`ONE_CHIP_MIN_TILES` tiles up to :data:`ONE_CHIP_COPIES` while every copy keeps
    :data:`ONE_CHIP_TILES_PER_LAYER` tiles a layer (with contexts, a tile holds up to ``tile_contexts`` layers, so
    a copy needs that many times fewer); on a smaller chip of several contexts a tile, up to
    :data:`SMALL_CHIP_COPIES` while every copy keeps a tile per ``tile_contexts`` layers; else 1."""
    if arch.chips > 1:
        return arch.chips
    tiles_of_layers = -(-max(1, n_layers) // arch.tile_contexts)
    if arch.n_tiles >= ONE_CHIP_MIN_TILES:
        return max(1, min(ONE_CHIP_COPIES, arch.n_tiles // (ONE_CHIP_TILES_PER_LAYER * tiles_of_layers)))
    if arch.tile_contexts > 1:
        return max(1, min(SMALL_CHIP_COPIES, arch.n_tiles // tiles_of_layers))
    return 1


def _stage_range(layers: list[LoweredLayer], stage: tuple[str, str]) -> tuple[int, int]:
    """``(a, b)``: the lowered layers ``first .. last`` of ``stage`` (their names), ``layers[a:b]``."""
    names = [layer.name for layer in layers]
    try:
        first, last = (names.index(name) for name in stage)
    except ValueError:
        missing = next(name for name in stage if name not in names)
        raise CompileError(f"replicated stage: no layer named {missing!r}; the layers are "
                           f"{', '.join(map(repr, names))}") from None
    if last < first:
        raise CompileError(f"replicated stage: layer {stage[1]!r} comes before {stage[0]!r}")
    return first, last + 1


def _compile_copies(layers: list[LoweredLayer], imported, arch: Arch, pack_input: bool, replicas: int,
                    stage: tuple[int, int] | None = None) -> Program:
    """``replicas`` copies of the lowered ``layers`` (only of ``layers[a:b]`` for ``stage = (a, b)``), with the host
    packing the first window when that fits and is faster."""
    plain = build_program(layers, arch, input_spec=imported.input, output_spec=imported.output,
                          model_name=imported.name, replicas=replicas, stage=stage)
    if not pack_input:
        return plain
    packed_layers, packed_spec = pack_input_window(layers, imported.input, arch.lanes)
    if packed_spec is imported.input:
        return plain
    try:  # the packed map is larger (OH*OW pixels of more words): it may not fit where the plain one does
        packed = build_program(packed_layers, arch, input_spec=packed_spec, output_spec=imported.output,
                               model_name=imported.name, replicas=replicas, stage=stage)
    except CompileError:
        return plain
    return packed if estimated_interval(packed) < estimated_interval(plain) else plain


def tile_estimate(config: TileConfig, lanes: int) -> int:
    """A tile's estimated cycles per inference: its busiest side
    (:meth:`flowtile.tile_config.TileConfig.tile_period_cycles`), COMPUTE charged with the words its forward queue
    cannot take in while it computes (:func:`compiler.partition.queue_shortfall_cycles`)."""
    period = config.tile_period_cycles(lanes)
    if not config.n_out or config.interleave_rows:   # rows interleaved: the queue holds rows, not an inference
        return period
    return max(period, config.compute_cycles + queue_shortfall_cycles(config.queued_words, config.queue_words))


def tile_program_estimate(tile: TileProgram, lanes: int) -> int:
    """A tile's estimated cycles per inference: :func:`tile_estimate` summed over its contexts, which each side
    serves in turn (docs/architecture.md section 4.6); with several, at least context 0's COMPUTE plus the RECV words
    up to its last stored one: context 1's input is context 0's output, whose last word follows context 0's COMPUTE,
    and the input side takes context 0's next inference only after context 1's turn, so that COMPUTE cannot overlap
    the next inference's RECV as one context's two banks let it."""
    total = sum(tile_estimate(config, lanes) for config in tile.contexts)
    if tile.later_contexts:
        total = max(total, tile.config.compute_cycles + tile.config.store_until)
    return total * tile.turns   # a tile of several turns (section 12) runs its inference once a turn


def estimated_interval(program: Program) -> int:
    """The slowest stage's cycles per (program) inference alone: a tile's (:func:`tile_program_estimate`) or, on
    several chips, a link's (:func:`compiler.partition.link_cycles` of the flits it carries; a ring's return link
    too)."""
    return max([tile_program_estimate(tile, program.arch.lanes) for tile in program.tiles]
               + [link_cycles(program.arch, link.inference_flits, link.segments) for link in program.links])


def report(program: Program) -> str:
    """A table: per layer its op, size, tiles, estimated cycles per inference and SRAM bytes used/available; on
    several chips also per chip (tiles computing, MACs, utilization) and per link (flits per inference, frames,
    cycles per inference, utilization, the link bound on the interval), with a warning when a link is the
    bottleneck."""
    arch = program.arch
    by_position = {(t.chip, t.row, t.col): t for t in program.tiles}
    position_of = {(t.chip, t.row, t.col): p for p, t in enumerate(program.tiles)}

    def place(tile: tuple[int, ...]) -> tuple[int, int, int]:
        return tuple(tile) if len(tile) == 3 else (0, *tile)

    def cycles(tile: TileProgram) -> int:
        return tile_program_estimate(tile, arch.lanes)

    def sram_used(tile: TileProgram) -> int:
        return sum((c.weight_words + (c.activation_words if c.n_out else 0)) * arch.lanes
                   for c in tile.contexts)

    rows = [("layer", "op", "elements in -> out", "MACs/inf", "tiles", "est. cycles/inf", "est. util",
             "SRAM bytes used/avail")]
    slowest = max([(max(cycles(by_position[place(t)]) for t in layer.tiles), f"layer '{layer.name}'")
                   for layer in program.layers])
    passing = [t for t in program.tiles if t.config.n_out == 0]
    if passing:
        slowest = max(slowest, (max(cycles(t) for t in passing), "pass-through tiles"))
    slowest_tile = slowest
    link_stages = [link_cycles(arch, link.inference_flits, link.segments) for link in program.links]
    if link_stages and max(link_stages) > slowest[0]:
        busiest = max(range(len(link_stages)), key=lambda k: link_stages[k])
        slowest = (link_stages[busiest], link_name(arch, busiest))
    interval = slowest[0]
    for layer in program.layers:
        tiles = list({place(t): by_position[place(t)] for t in layer.tiles}.values())   # a tile once
        span = f"{len(tiles)} ({position_of[place(layer.tiles[0])]}..{position_of[place(layer.tiles[-1])]})"
        # steady state: the layer's MACs (once a turn) over its tiles' lanes for one interval of the slowest stage
        utilization = layer.macs * layer.turns / (interval * len(tiles) * arch.lanes)
        rows.append((layer.name, layer.op + ("+Relu" if layer.relu else ""), f"{layer.n_in} -> {layer.n_out}",
                     str(layer.macs), span, str(max(cycles(t) for t in tiles)), f"{100 * utilization:.1f}%",
                     f"{sum(sram_used(t) for t in tiles)}/{len(tiles) * arch.sram_bytes}"))
    shared = [t for t in program.tiles if t.later_contexts]
    if passing:
        rows.append(("(pass-through)", "-", "-", "0", str(len(passing)), str(max(cycles(t) for t in passing)), "0.0%",
                     f"0/{len(passing) * arch.sram_bytes}"))
    lines = _table(rows)
    grid = (f"{arch.rows}x{arch.cols} tiles" if arch.chips == 1
            else f"{arch.chips} chips of {arch.rows}x{arch.cols} tiles")
    copies = program.replicas
    per = "cycles/inference" if copies == 1 else "cycles per program inference"
    lines.append(f"{program.model_name or 'model'}: {grid}, {arch.lanes} lanes, "
                 f"{program.macs_per_inference} MACs/inference; estimated interval {interval} {per} "
                 f"(bottleneck: {slowest[1]}); estimated steady-state MAC utilization "
                 f"{100 * program.macs_per_inference * copies / (interval * arch.system_tiles * arch.lanes):.1f}%")
    memory = arch.tile_memory_bits
    total_mbit = arch.system_tiles * sum(memory.values()) / 1e6
    if program.replicas > 1:
        stage = [layer.name for layer in program.layers if layer.turns == 1]
        what = (f"layers '{stage[0].removesuffix(' [copy 0]')}' .. '{stage[-1].removesuffix(f' [copy {copies - 1}]')}' "
                f"(alternate inferences; the other layers shared, their tiles run once per inference)"
                if len(stage) < len(program.layers) else "the network (alternate inferences)")
        lines.append(f"{copies} copies of {what}: a program inference is {copies} "
                     f"inferences, their inputs and outputs back to back; estimated interval {interval} cycles per "
                     f"program inference / {copies} = {interval / copies:.1f} cycles per inference")
    lines.append(f"throughput per area: {program.macs_per_inference * copies / interval / total_mbit:.2f} MACs/cycle per Mbit "
                 f"of memory ({total_mbit:.2f} Mbit in {arch.system_tiles} tiles: "
                 + ", ".join(f"{name.replace('_', ' ')} {bits * arch.system_tiles / 1e6:.2f}"
                             for name, bits in memory.items())
                 + "); logic cells per tile: `flowtile area` (docs/area.md)")
    lines.append("estimates are per tile without stalls (section 6 rule 4); back-pressure between the tiles of a "
                 "split layer can make the real interval longer")
    if arch.chips > 1:
        lines += _chip_report(program, interval, link_stages, slowest_tile)
    output = program.output
    if output.post == "softmax":
        quantized = (f", then quantized and dequantized (scale {output.post_quant[0]:.6g}, zero point "
                     f"{output.post_quant[1]}, {output.post_quant[2]}) as the model does" if output.post_quant else "")
        lines.append(f"host: the model's last op, a Softmax over axis {output.post_axis} (output "
                     f"'{output.post_name}'), runs on the host in float after the chip's last layer{quantized}; the "
                     f"chip outputs its input '{output.name}' (int8, compared with onnxruntime's)")
    if shared:
        lines.append(f"{len(shared)} tile(s) run several layers in turn (contexts, docs/architecture.md section 4.6; "
                     f"arch field 'tile_contexts' = {arch.tile_contexts}): "
                     + ", ".join(f"{t.key} {len(t.contexts)}" for t in shared[:8]) + (", ..." if len(shared) > 8 else ""))
    single = [t for t in program.tiles if any(c.single_bank for c in t.contexts)]
    if single:
        lines.append(f"{len(single)} tile(s) keep one activation bank where two do not fit (register single_bank, "
                     f"docs/architecture.md section 4): each receives the next inference after it computes: "
                     + ", ".join(t.key for t in single[:8]) + (", ..." if len(single) > 8 else ""))
    # a pass-through tile computes nothing, so streaming through its queue never holds anything up
    short = [t for t in program.tiles if t.config.n_out and t.config.queued_words > t.config.queue_words]
    if short:
        worst = max(short, key=lambda t: t.config.queued_words - t.config.queue_words)
        c = worst.config
        lines.append(f"{len(short)} tile(s) forward and pass more words per inference than their forward queue (the "
                     f"SRAM their weights and banks leave free) holds (e.g. tile {worst.key}: {c.queued_words} words, "
                     f"queue {c.queue_words}; arch field 'sram_bytes' = {arch.sram_bytes}): they cannot take a whole "
                     f"inference in while they compute")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def chip_macs(program: Program) -> list[int]:
    """MACs per (program) inference each chip computes: every layer's MACs (a layer of several turns once a turn,
    section 12) shared among its tiles in proportion to their COMPUTE issue cycles."""
    arch = program.arch
    by_place = {(t.chip, t.row, t.col): t for t in program.tiles}
    macs = [0.0] * arch.chips
    for layer in program.layers:
        tiles = [by_place[tuple(t) if len(t) == 3 else (0, *t)] for t in layer.tiles]
        issue = [t.contexts[layer.context_of(i)].compute_issue_cycles for i, t in enumerate(tiles)]
        for tile, cycles in zip(tiles, issue):
            macs[tile.chip] += layer.macs * layer.turns * (cycles / sum(issue) if sum(issue) else 1 / len(tiles))
    return [round(m) for m in macs]


def _chip_report(program: Program, interval: int, link_stages: list[int], slowest_tile: tuple[int, str]) -> list[str]:
    """Per chip: computing tiles, MACs, slowest tile, estimated utilization; per link: flits, frames, cycles per
    inference, utilization; the link bound; a warning when a link is the bottleneck."""
    arch, lanes = program.arch, program.arch.lanes
    geometry = LinkGeometry(arch)
    macs = chip_macs(program)
    rows = [("chip", "tiles computing", "MACs/inf", "slowest tile cycles/inf", "est. util", "exit flits/inf")]
    for chip in range(arch.chips):
        tiles = program.tiles[chip * arch.n_tiles:(chip + 1) * arch.n_tiles]
        computing = sum(1 for t in tiles if t.config.n_out)
        rows.append((str(chip), f"{computing}/{arch.n_tiles}", str(macs[chip]),
                     str(max(t.turns * sum(c.tile_period_cycles(lanes) for c in t.contexts) for t in tiles)),
                     f"{100 * macs[chip] / (interval * arch.n_tiles * lanes):.1f}%",
                     str(tiles[-1].turns * tiles[-1].output_config.output_flits(lanes))))
    lines = [""] + _table(rows)
    rows = [("link", "flits/inf", "frames/inf", "link cycles/inf", "est. util", "bytes carried/sent")]
    for k, (link, stage) in enumerate(zip(program.links, link_stages)):
        carried = int(flit_lanes(link.segments, link.inference_flits, lanes).sum())
        to = f"-> {k + 1}" if k + 1 < arch.chips else "-> host at chip 0"   # a ring's return link: to the host
        rows.append((f"{k} (chip {k} {to})", str(link.inference_flits),
                     str(geometry.frames(link.inference_flits, link.segments)), str(stage),
                     f"{100 * stage / interval:.1f}%", f"{carried}/{link.inference_flits * lanes}"))
    lines += [""] + _table(rows)
    busiest = max(range(len(link_stages)), key=lambda k: link_stages[k])
    flits = program.links[busiest].inference_flits
    bound = link_stages[busiest]
    # a replicated program (whole copies or a stage, section 12) counts per program inference of its copies
    per = "inference" if program.replicas == 1 else "program inference"
    lines.append(f"links: {arch.link_bits} wire bits/cycle, frames of {geometry.frame_bytes} bytes ("
                 f"{geometry.frame_flits} flits of every lane; only channels cross, not their padding lanes) in "
                 f"{geometry.frame_beats} beats ({geometry.flits_per_cycle:.4f} flits/cycle at best), latency "
                 f"{geometry.latency} cycles (delay only); link bound on the interval: {bound} cycles/{per} "
                 f"(link {busiest}: {flits} flits/{per} x {bound / max(flits, 1):.2f} cycles/flit)")
    if bound > slowest_tile[0]:
        lines.append(f"warning: {link_name(arch, busiest)} is the bottleneck: {bound} cycles/{per}, "
                     f"{bound / slowest_tile[0]:.2f}x the slowest tile's {slowest_tile[0]} ({slowest_tile[1]}); "
                     f"tiles idle {100 * (1 - slowest_tile[0] / bound):.0f}% of the interval waiting for it")
    return lines
