"""The program artifact: what the compiler emits and both the emulator and the RTL run.

A program is a directory (format ``flowtile-program``, version :data:`FORMAT_VERSION`)::

    PROG/
      program.json   manifest: arch, host tensors, layers (for reports), per-tile config registers
      arrays.npz     per-tile SRAM images and parameter tables (plain arrays, loaded without pickle)

See docs/architecture.md, "Program format", for every field.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arch import ACC_BITS, MULTIPLIER_BITS, OP_MAX, SHIFT_BITS, Arch, ArchError
from .tile_config import ConfigError, TileConfig
from .link_format import LaneSegment, check_lane_table

__all__ = ["Program", "TileProgram", "LinkProgram", "TensorSpec", "LayerInfo", "ProgramError", "FORMAT_VERSION",
           "check_program_destination", "TileConfig", "ConfigError", "link_count", "link_name"]

FORMAT_NAME = "flowtile-program"
FORMAT_VERSION = 14


class ProgramError(ValueError):
    """A program directory is missing, malformed, or inconsistent with its arch."""


def link_count(arch: Arch) -> int:
    """The links of a system of ``arch`` (docs/architecture.md section 12): none on one chip; ``chips - 1`` in a
    line (link ``k`` joins chip ``k`` to chip ``k + 1``); ``chips`` in a ring, whose link ``chips - 1`` (the return
    link) joins the last chip's exit port back to chip 0's board, where its receiver delivers to the host output."""
    if arch.chips == 1:
        return 0
    return arch.chips if arch.chip_topology == "ring" else arch.chips - 1


def link_name(arch: Arch, k: int) -> str:
    """Link ``k`` in messages and reports: ``link k (chip k -> chip k+1)``, or for a ring's return link ``link k (chip
    k -> host at chip 0)``."""
    if arch.chip_topology == "ring" and k == arch.chips - 1:
        return f"link {k} (chip {k} -> host at chip 0)"
    return f"link {k} (chip {k} -> chip {k + 1})"


#: What a parameter-table entry holds (section 4): bias wraps with the accumulator, the multiplier is unsigned,
#: the right shift is in 1..2**SHIFT_BITS - 2.
PARAMETER_RANGES = (("bias", -(1 << (ACC_BITS - 1)), (1 << (ACC_BITS - 1)) - 1),
                    ("multiplier", 0, (1 << MULTIPLIER_BITS) - 1), ("shift", 1, (1 << SHIFT_BITS) - 2))


def _check_parameters(tile: "TileProgram") -> None:
    """The parameter table holds one ``(bias, multiplier, shift)`` row per output of each context (context ``c``'s
    rows from ``param_base``, section 4.6; ``max(param_base + n_out)`` rows), each within its range; a max-pooling
    context's rows are never read (section 4.1), so only the table's shape counts for them."""
    rows = max(config.param_base + config.n_out for config in tile.contexts)
    params = np.asarray(tile.params)
    if params.shape != (rows, 3):
        what = "max(param_base + n_out) over its contexts" if tile.later_contexts else "n_out"
        raise ProgramError(f"tile {tile.key}: parameter table must be [{rows}, 3] ({what}), got "
                           f"{list(params.shape)}")
    for config in tile.contexts:
        if config.op == OP_MAX:
            continue
        for column, (name, low, high) in enumerate(PARAMETER_RANGES):
            values = params[config.param_base:config.param_base + config.n_out, column]
            bad = np.flatnonzero((values < low) | (values > high))
            if bad.size:
                raise ProgramError(f"tile {tile.key}: output {bad[0]} has {name} {values[bad[0]]}, outside "
                                   f"{low}..{high}")


def _check_turns(tile: "TileProgram") -> None:
    """A tile's ``turns`` (section 12, replicated stages): a positive integer; with several, one context (its turns
    are the ordinary inferences of sections 4 to 4.5, a tile of contexts runs its contexts within one) and weights
    apart from the activation banks (the emulator refuses, by timing, only a tile of one turn whose inference writes
    weights a COMPUTE reads: section 4)."""
    turns = tile.turns
    if isinstance(turns, bool) or not isinstance(turns, (int, np.integer)) or turns < 1:
        raise ProgramError(f"tile {tile.key}: turns must be a positive integer (inferences per program inference), "
                           f"got {turns!r}")
    if turns == 1:
        return
    if tile.later_contexts:
        raise ProgramError(f"tile {tile.key}: turns = {turns} with {len(tile.contexts)} contexts; a tile of several "
                           f"turns has one context (section 12)")
    config = tile.config
    if not config.n_out:
        raise ProgramError(f"tile {tile.key}: turns = {turns} but n_out = 0; a tile of several turns computes (one "
                           f"that only passes the stream takes a program inference as one inference, section 12)")
    if config.weights_overlap_activations:
        raise ProgramError(f"tile {tile.key}: turns = {turns}, and its weights [w_base, w_base + weight words) = "
                           f"[{config.w_base}, {config.w_base + config.weight_words}) overlap its activation "
                           f"banks [{config.act_base}, {config.act_base + config.activation_words}); a tile of "
                           f"several turns keeps them apart (section 12)")


def _check_contexts(tile: "TileProgram", arch: Arch) -> None:
    """The rules between the contexts of one tile (docs/architecture.md section 4.6): at most ``tile_contexts``;
    with two or more, each computes, ``loop_back`` is 1 in all but the last, each queues a whole inference of what
    it forwards and passes (else the loop-back FIFO could deadlock), each context ``c >= 1`` receives what context
    ``c - 1`` emits, and SRAM regions and parameter rows are pairwise disjoint; none keeps a line buffer (section 4,
    streaming rows). A tile of one context needs ``loop_back = 0``."""
    contexts = tile.contexts
    if len(contexts) > arch.tile_contexts:
        raise ProgramError(f"tile {tile.key}: {len(contexts)} contexts exceed arch field 'tile_contexts' = "
                           f"{arch.tile_contexts}")
    if len(contexts) > 1 and any(config.stream_rows for config in contexts):
        raise ProgramError(f"tile {tile.key}: a line buffer (stream_rows) serves a tile of one context (section 4, "
                           f"streaming rows)")
    for index, config in enumerate(contexts):
        last = index == len(contexts) - 1
        if config.loop_back != (0 if last else 1):
            why = ("the tile's last context emits to the router" if last
                   else f"it feeds context {index + 1} through the loop-back FIFO")
            raise ProgramError(f"tile {tile.key} context {index}: config register loop_back = {config.loop_back} must "
                               f"be {0 if last else 1} ({why}; section 4.6)")
    if len(contexts) == 1:
        return
    for index, config in enumerate(contexts):
        if config.n_out == 0:
            raise ProgramError(f"tile {tile.key} context {index}: n_out = 0, but every context of a tile with "
                               f"several computes (section 4.6)")
        if config.queue_words < config.queued_words:
            raise ProgramError(f"tile {tile.key} context {index}: queue_words = {config.queue_words} is less than "
                               f"the {config.queued_words} words it forwards and passes per inference; in a tile of "
                               f"several contexts each queue must hold them, else the loop-back FIFO can deadlock "
                               f"(section 4.6)")
        if index:
            emitted = contexts[index - 1].output_flits(arch.lanes)
            received = config.n_in_words + config.n_pass
            if received != emitted:
                raise ProgramError(f"tile {tile.key} context {index}: n_in_words + n_pass = {received}, but context "
                                   f"{index - 1} emits {emitted} words per inference into the loop-back FIFO "
                                   f"(section 4.6)")
    claimed = []
    for index, config in enumerate(contexts):
        for what, begin, end in config.sram_regions():
            for other, other_what, other_begin, other_end in claimed:
                if other != index and begin < other_end and other_begin < end:
                    raise ProgramError(f"tile {tile.key}: context {index}'s {what} = [{begin}, {end}) overlaps "
                                       f"context {other}'s {other_what} = [{other_begin}, {other_end}) (section 4.6)")
            claimed.append((index, what, begin, end))
    rows = sorted((config.param_base, config.param_base + config.n_out, index) for index, config in enumerate(contexts))
    for (begin, end, index), (other_begin, _, other) in zip(rows, rows[1:]):
        if other_begin < end:
            raise ProgramError(f"tile {tile.key}: context {other}'s parameter rows from param_base = {other_begin} "
                               f"overlap context {index}'s [{begin}, {end}) (section 4.6)")


PROGRAM_FILES = frozenset({"program.json", "arrays.npz"})


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_program_destination(directory: str | Path) -> Path:
    """Check that :meth:`Program.save` may write ``directory``: it does not exist, or it is a flowtile program
    directory (``program.json`` naming the format, plus at most ``arrays.npz``), which is then replaced. Any other
    file or directory, the current directory or one holding it, is refused: flowtile never deletes what it did
    not write."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return directory
    if directory.is_symlink() or not directory.is_dir():
        raise ProgramError(f"output '{directory}' exists and is not a directory; flowtile will not replace it")
    if Path.cwd().resolve().is_relative_to(directory.resolve()):
        raise ProgramError(f"output '{directory}' is the current directory or holds it; give a new directory name")
    entries = {entry.name for entry in directory.iterdir()}
    foreign = sorted(entries - PROGRAM_FILES)
    if "program.json" not in entries or foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ProgramError(f"output '{directory}' is an existing directory that is not a flowtile program"
                           + (f" (it holds {listed})" if foreign else " (no program.json)")
                           + "; flowtile replaces only its own program directories: give a new directory name")
    try:
        is_program = json.loads((directory / "program.json").read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        is_program = False
    if not is_program:
        raise ProgramError(f"output '{directory}' holds a program.json that is not a {FORMAT_NAME} manifest; "
                           f"flowtile will not replace it")
    return directory


@dataclass(frozen=True)
class TensorSpec:
    """A host-side tensor: the float tensor the model sees and its int8 encoding on the chip.

    ``dtype`` is the ONNX integer type ("int8" or "uint8"); on chip every value is int8: uint8 values
    travel as ``q - 128`` with ``zero_point - 128``. ``shape`` excludes the batch dimension.
    """

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    dtype: str = "int8"
    #: "flat": the tensor's elements in order, ``L`` a flit. "chw": ``shape`` is (C, H, W) and the tensor
    #: travels as a feature map, pixel-major, ``ceil(C / L)`` words a pixel (section 4.1). "im2col" (program
    #: inputs only, section 7): the host sends, for every output pixel of the first layer's window
    #: (``window``), the window's values as channels ``(ky*KW + kx)*C + c``, padded positions holding the zero
    #: point, ``ceil(KH*KW*C / L)`` words a pixel. "tc": ``shape`` is (T, C), a sequence ``[N, T, C]`` (what
    #: ``nn.Linear`` reads over its last axis) travelling as a 1 x T map of C channels: ``[T][C]`` row-major is
    #: already pixel-major, so step ``t`` is pixel ``t``, ``ceil(C / L)`` words a pixel, padding lanes zero.
    #: "dense" (program inputs only, section 4.5): ``shape`` is (C, H, W) and the map travels pixel-major with no
    #: padding lanes: element ``(c, y, x)`` is byte ``(y*W + x)*C + c`` of the tensor, ``L`` bytes a flit,
    #: ``ceil(C*H*W / L)`` flits (the last one zero-padded); only op BCAST tiles read it.
    layout: str = "flat"
    #: layout "im2col": ``(kernel_h, kernel_w, stride, pad_top, pad_left, out_height, out_width)``
    window: tuple[int, ...] | None = None
    #: Program outputs only: a host post-op applied in float after dequantizing (:func:`flowtile.host.outputs_from_flits`):
    #: None, or "softmax" (the model's trailing Softmax; the chip computes its input, this tensor).
    post: str | None = None
    #: post "softmax": the axis of the float output ``[batch, *shape]`` it normalizes (1 .. len(shape)).
    post_axis: int = -1
    #: post "softmax" followed by Q/DQ in the model: ``(scale, zero_point, dtype)`` the host quantizes and
    #: dequantizes the Softmax's output with (what onnxruntime returns); None: the float Softmax.
    post_quant: tuple | None = None
    #: post: the model's output tensor after the post-op (the name onnxruntime gives it).
    post_name: str | None = None
    #: Program inputs only: the published model's input is ``[batch, *shape]`` laid out otherwise, and the host
    #: transposes it by this permutation (batch axis included, as an ONNX ``Transpose``'s ``perm``) into
    #: ``[batch, *shape]``: ``(0, 3, 1, 2)`` for an NHWC image input (tf2onnx's Keras models; the importer removed
    #: the model's leading Transpose, compiler/normalize.py ``channels_last_input``). :func:`flowtile.host.model_layout`
    #: applies it; None: the input is taken as it is.
    host_transpose: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layout not in ("flat", "chw", "im2col", "tc", "dense"):
            raise ProgramError(f"tensor '{self.name}': layout '{self.layout}' is not 'flat', 'chw', 'im2col', 'tc' "
                               f"or 'dense'")
        if self.layout in ("chw", "im2col", "dense") and len(self.shape) != 3:
            raise ProgramError(f"tensor '{self.name}': layout '{self.layout}' needs a (C, H, W) shape, "
                               f"got {list(self.shape)}")
        if self.layout == "tc" and (len(self.shape) != 2 or min(self.shape) < 1):
            raise ProgramError(f"tensor '{self.name}': layout 'tc' needs a (T, C) shape, got {list(self.shape)}")
        if (self.layout == "im2col") != (self.window is not None):
            raise ProgramError(f"tensor '{self.name}': a window is given iff the layout is 'im2col'")
        if self.window is not None and (len(self.window) != 7 or min(self.window) < 0
                                        or min(self.window[:3] + self.window[5:]) < 1):
            raise ProgramError(f"tensor '{self.name}': window {list(self.window)} is not (kernel_h, kernel_w, "
                               f"stride, pad_top, pad_left, out_height, out_width) with positive sizes")
        if self.post not in (None, "softmax"):
            raise ProgramError(f"tensor '{self.name}': post-op '{self.post}' is not 'softmax'")
        if self.post is not None and not 1 <= self.post_axis <= len(self.shape):
            raise ProgramError(f"tensor '{self.name}': softmax axis {self.post_axis} is not an axis of "
                               f"[batch, {', '.join(map(str, self.shape))}] other than the batch")
        if self.host_transpose is not None and (sorted(self.host_transpose) != list(range(len(self.shape) + 1))
                                                or self.host_transpose[0] != 0):
            raise ProgramError(f"tensor '{self.name}': host transpose {list(self.host_transpose)} is not a permutation "
                               f"of the {len(self.shape) + 1} axes keeping the batch axis 0 first")
        if self.post_quant is not None and (len(self.post_quant) != 3 or not float(self.post_quant[0]) > 0
                                            or self.post_quant[2] not in ("int8", "uint8")):
            raise ProgramError(f"tensor '{self.name}': post quantization {list(self.post_quant)} is not "
                               f"(scale > 0, zero_point, 'int8' or 'uint8')")

    @property
    def length(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def words(self, lanes: int) -> int:
        """Flits one tensor takes on the chip."""
        if self.layout == "chw":
            channels, height, width = self.shape
            return height * width * -(-channels // lanes)
        if self.layout == "im2col":
            kernel_h, kernel_w, _, _, _, out_height, out_width = self.window
            return out_height * out_width * -(-kernel_h * kernel_w * self.shape[0] // lanes)
        if self.layout == "tc":
            steps, channels = self.shape
            return steps * -(-channels // lanes)
        return -(-self.length // lanes)

    def to_dict(self):
        d = {"name": self.name, "shape": list(self.shape), "scale": self.scale,
             "zero_point": self.zero_point, "dtype": self.dtype, "layout": self.layout}
        if self.window is not None:
            d["window"] = list(self.window)
        if self.host_transpose is not None:  # only then, like "post"
            d["host_transpose"] = list(self.host_transpose)
        if self.post is not None:  # only then: programs without a post-op keep the version-6 manifest unchanged
            d["post"] = {"op": self.post, "axis": self.post_axis, "name": self.post_name,
                         "quant": list(self.post_quant) if self.post_quant is not None else None}
        return d

    @classmethod
    def from_dict(cls, d):
        window = d.get("window")
        post = d.get("post") or {}
        quant = post.get("quant")
        return cls(d["name"], tuple(int(s) for s in d["shape"]), float(d["scale"]), int(d["zero_point"]),
                   d.get("dtype", "int8"), d.get("layout", "flat"),
                   tuple(int(v) for v in window) if window is not None else None,
                   post.get("op"), int(post.get("axis", -1)),
                   (float(quant[0]), int(quant[1]), str(quant[2])) if quant is not None else None, post.get("name"),
                   tuple(int(v) for v in d["host_transpose"]) if d.get("host_transpose") is not None else None)


@dataclass(frozen=True)
class LayerInfo:
    """Report-only description of one compiled layer (the hardware never reads it)."""

    name: str
    op: str
    n_in: int                     # input elements (a feature map counts C*H*W)
    n_out: int                    # output elements
    tiles: tuple[tuple[int, int], ...]
    relu: bool = False
    #: The layer's multiply-accumulates per inference, padding excluded; None: dense, ``n_in * n_out``.
    mac_count: int | None = None
    #: the context of each of ``tiles`` that computes the layer (section 4.6); empty: context 0 of each
    contexts: tuple[int, ...] = ()
    #: inferences its tiles run per program inference (section 12: a layer every copy of a replicated stage shares
    #: runs once per copy); its ``macs`` are one inference's
    turns: int = 1

    def context_of(self, index: int) -> int:
        """The context of ``tiles[index]`` that computes this layer."""
        return self.contexts[index] if self.contexts else 0

    def __post_init__(self):
        if self.mac_count is None:
            object.__setattr__(self, "mac_count", self.n_in * self.n_out)
        object.__setattr__(self, "contexts", tuple(self.contexts) if any(self.contexts) else ())

    @property
    def macs(self) -> int:
        return self.mac_count

    def to_dict(self):
        return {"name": self.name, "op": self.op, "n_in": self.n_in, "n_out": self.n_out,
                "tiles": [list(t) for t in self.tiles], "relu": self.relu, "macs": self.macs,
                **({"contexts": list(self.contexts)} if any(self.contexts) else {}),
                **({"turns": self.turns} if self.turns != 1 else {})}

    @classmethod
    def from_dict(cls, d):
        return cls(d["name"], d["op"], int(d["n_in"]), int(d["n_out"]),
                   tuple(tuple(int(v) for v in t) for t in d["tiles"]), bool(d.get("relu", False)),
                   int(d["macs"]) if "macs" in d else None, tuple(int(c) for c in d.get("contexts", ())),
                   int(d.get("turns", 1)))


@dataclass
class TileProgram:
    """What one tile is loaded with before a run.

    ``config`` holds every register of :data:`flowtile.arch.CONFIG_FIELDS` (a :class:`TileConfig`; a dict naming
    every register is converted); ``sram`` is the SRAM image from word 0 (int8 values, shape ``[words, lanes]``,
    words beyond it are zero); ``params`` is the parameter table, one row per output neuron:
    ``(bias, multiplier, shift)``. ``chip``: which chip of a multi-chip system (``Arch.chips``) the tile is on.
    ``later_contexts``: the tile's contexts after the first (docs/architecture.md section 4.6), each a layer the
    tile runs in turn after ``config``'s; ``sram`` and ``params`` then hold every context's words and rows.
    ``turns``: the inferences the tile runs per program inference (section 12, replicated stages): a tile of a
    stage that every copy of a replicated program shares runs its registers once for each copy's inference, on
    the copies' streams one after the other (the hardware sees ``turns`` ordinary inferences: no register says so;
    the emulator and the stream counts do).
    """

    row: int
    col: int
    config: TileConfig
    sram: np.ndarray = field(repr=False)
    params: np.ndarray = field(repr=False)
    chip: int = 0
    later_contexts: tuple[TileConfig, ...] = ()
    turns: int = 1

    def __post_init__(self):
        try:
            self.config = TileConfig.coerce(self.config)
            self.later_contexts = tuple(TileConfig.coerce(config) for config in self.later_contexts)
        except ConfigError as error:
            raise ProgramError(f"tile {self.key}: {error}") from None

    @property
    def contexts(self) -> tuple[TileConfig, ...]:
        """Every context's registers in turn order: ``config`` (context 0), then ``later_contexts``."""
        return (self.config, *self.later_contexts)

    @property
    def output_config(self) -> TileConfig:
        """The registers of the context whose output stream is the tile's: the last (section 4.6)."""
        return self.later_contexts[-1] if self.later_contexts else self.config

    @property
    def key(self) -> str:
        """``r{row}c{col}``, prefixed ``chip{k}.`` on chips after the first (names the tile in messages and arrays)."""
        return f"r{self.row}c{self.col}" if self.chip == 0 else f"chip{self.chip}.r{self.row}c{self.col}"


@dataclass(frozen=True)
class LinkProgram:
    """The registers of link ``k`` (``Program.links[k]``), from chip ``k`` to chip ``k + 1`` (in a ring, link
    ``chips - 1`` from the last chip to the host output on chip 0's board, :func:`link_count`): ``inference_flits``,
    the flits that cross it per inference (its frames never span inferences, docs/architecture.md section 12),
    and ``segments``, its lane table (:class:`flowtile.link_format.LaneSegment`: how many lanes each flit carries;
    the others are channel padding, not sent and zero on arrival). ``inference_flits`` equals what chip ``k``'s exit
    tile emits per inference (:meth:`Program.validate` checks it and the table)."""

    inference_flits: int
    segments: tuple[LaneSegment, ...] = ()

    def to_dict(self) -> dict:
        return {"inference_flits": self.inference_flits,
                "segments": [segment.to_list() for segment in self.segments]}

    @classmethod
    def from_dict(cls, values: dict) -> "LinkProgram":
        unknown = sorted(set(values) - {"inference_flits", "segments"})
        if unknown:
            raise ProgramError(f"link registers: unknown field(s) {', '.join(map(repr, unknown))}")
        try:
            segments = tuple(LaneSegment(*map(int, segment)) for segment in values.get("segments", []))
        except (TypeError, ValueError):
            raise ProgramError(f"link registers: 'segments' must be a list of [flits, period, last_lanes], got "
                               f"{values.get('segments')!r}") from None
        return cls(int(values["inference_flits"]), segments)


@dataclass
class Program:
    arch: Arch
    input: TensorSpec
    output: TensorSpec
    layers: list[LayerInfo]
    tiles: list[TileProgram]          # in system chain order: tiles[p] sits at arch.system_position(p)
    model_name: str = ""
    #: one per link (:func:`link_count`): ``chips - 1`` in a line; ``chips`` in a ring, the last one the return link
    #: that carries the last chip's output stream to the host
    links: list[LinkProgram] = field(default_factory=list)
    #: copies of the network on the chain, taking alternate inferences (section 12): one program inference is
    #: ``replicas`` real ones, whose inputs the host sends back to back and whose outputs it receives in order
    replicas: int = 1

    # --- derived ------------------------------------------------------------------------------
    @property
    def input_words(self) -> int:
        """Flits the host sends per (real) inference."""
        return self.input.words(self.arch.lanes)

    @property
    def output_words(self) -> int:
        """Flits the host receives per (real) inference."""
        return self.output.words(self.arch.lanes)

    @property
    def program_input_words(self) -> int:
        """Flits the host sends per program inference: ``replicas`` inputs back to back (what the tiles' and the
        links' per-inference registers count)."""
        return self.replicas * self.input_words

    @property
    def program_output_words(self) -> int:
        """Flits the host receives per program inference: ``replicas`` outputs in order."""
        return self.replicas * self.output_words

    def program_inferences(self, batch: int) -> tuple["Program", int]:
        """``(program, count)`` to run ``batch`` real inferences as ``count = batch // replicas`` program
        inferences: ``self`` when ``replicas`` is 1, else a one-copy view of it whose host tensors are one
        program inference's flits (flat, ``replicas`` inputs and outputs back to back), what the emulator and
        the RTL harness count per inference. The flits sent and received are the same either way.
        ValueError when ``batch`` is not a multiple of ``replicas`` (the host pads: :func:`flowtile.host.pad_batch`)."""
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if batch % self.replicas:
            raise ValueError(f"batch {batch} is not a multiple of the program's {self.replicas} copies of the network "
                             f"(replicas): each program inference runs {self.replicas} inferences; pad the batch "
                             f"(flowtile.host.pad_batch)")
        if self.replicas == 1:
            return self, int(batch)
        lanes = self.arch.lanes

        def flat(spec: TensorSpec, words: int) -> TensorSpec:
            return TensorSpec(f"{spec.name} x{self.replicas}", (words * lanes,), spec.scale, spec.zero_point)

        view = Program(arch=self.arch, input=flat(self.input, self.program_input_words),
                       output=flat(self.output, self.program_output_words), layers=self.layers, tiles=self.tiles,
                       model_name=self.model_name, links=self.links)
        return view, int(batch) // self.replicas

    @property
    def macs_per_inference(self) -> int:
        """MACs per (real) inference: the layers' (a layer of several turns once a turn) over the copies of the
        network."""
        return sum(layer.macs * layer.turns for layer in self.layers) // self.replicas

    def validate(self) -> None:
        """Check the program against its arch: tile positions, every tile's registers (:meth:`TileConfig.validate`:
        the one place the register rules live), its SRAM image and its parameter table (shape and ranges). The
        emulator and the RTL run call this and check no register rule of their own."""
        arch = self.arch
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, (int, np.integer)) or self.replicas < 1:
            raise ProgramError(f"replicas must be a positive integer (copies of the network), got {self.replicas!r}")
        if len(self.tiles) != arch.system_tiles:
            raise ProgramError(f"program has {len(self.tiles)} tiles, arch has {arch.system_tiles}"
                               + (f" ({arch.chips} chips of {arch.n_tiles})" if arch.chips > 1 else ""))
        links = link_count(arch)
        if len(self.links) != links:
            shape = (f"in a ring (arch field 'chip_topology' = 'ring': the last chip's output returns to the host at "
                     f"chip 0 over link {arch.chips - 1})" if arch.chip_topology == "ring" and arch.chips > 1
                     else "in a line")
            raise ProgramError(f"program has {len(self.links)} link register set(s), arch has {arch.chips} chip(s) "
                               f"{shape}, so {links} link(s)")
        for position, tile in enumerate(self.tiles):
            if (tile.chip, tile.row, tile.col) != arch.system_position(position):
                expected = arch.system_position(position)
                raise ProgramError(f"tile {position} is at chip {tile.chip} ({tile.row},{tile.col}), "
                                   f"the chain expects chip {expected[0]} ({expected[1]},{expected[2]})")
            if not isinstance(tile.config, TileConfig):
                raise ProgramError(f"tile {tile.key}: config must be a TileConfig, got {type(tile.config).__name__}")
            for index, config in enumerate(tile.contexts):
                if not isinstance(config, TileConfig):
                    raise ProgramError(f"tile {tile.key}: config must be a TileConfig, got {type(config).__name__}")
                try:
                    config.validate(arch)
                except ConfigError as error:
                    where = f"tile {tile.key}" + (f" context {index}" if tile.later_contexts else "")
                    raise ProgramError(f"{where}: {error}") from None
            _check_contexts(tile, arch)
            _check_turns(tile)
            if tile.sram.ndim != 2 or tile.sram.shape[1] != arch.lanes or tile.sram.dtype != np.int8:
                raise ProgramError(f"tile {tile.key}: SRAM image must be int8 [words, {arch.lanes}], "
                                   f"got {tile.sram.dtype} {list(tile.sram.shape)}")
            if tile.sram.shape[0] > arch.sram_words:
                raise ProgramError(f"tile {tile.key}: SRAM image needs {tile.sram.shape[0] * arch.lanes} bytes, "
                                   f"tile has {arch.sram_bytes} (arch field 'sram_bytes')")
            _check_parameters(tile)
        for chip, link in enumerate(self.links):
            exit_tile = self.tiles[(chip + 1) * arch.n_tiles - 1]
            exit_config = exit_tile.output_config
            emitted = exit_tile.turns * exit_config.output_flits(arch.lanes)   # per program inference: every turn's
            name = link_name(arch, chip)
            to_host = chip == arch.chips - 1     # a ring's return link: its receiver feeds the host output
            if not isinstance(link.inference_flits, int) or link.inference_flits != emitted:
                raise ProgramError(f"{name}: register inference_flits = {link.inference_flits}, but exit tile "
                                   f"{exit_tile.key} of chip {chip} sends {emitted} flits per inference")
            try:
                check_lane_table(link.segments, link.inference_flits, arch.lanes, owner=f"link {chip} lane table")
            except ValueError as error:
                raise ProgramError(str(error)) from None
            if not exit_config.dest_host:
                raise ProgramError(f"link {chip}: exit tile {exit_tile.key} of chip {chip} does not send to the host "
                                   f"port (dest_host = 0), so nothing would cross the link")
            destination = (exit_config.dest_row, exit_config.dest_col)
            if destination != (0, 0) and not to_host:
                raise ProgramError(f"link {chip}: exit tile {exit_tile.key} of chip {chip} sends to tile "
                                   f"({destination[0]},{destination[1]}) of chip {chip + 1}, but a link carries only "
                                   f"data and delivers every flit to tile (0,0): exit tile of chip {chip} must send to "
                                   f"(0,0) with dest_host = 1")

    # --- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the program directory atomically: into a hidden sibling, renamed into place, so a failed save
        leaves no partial directory. An existing ``directory`` is replaced only if it is a flowtile program
        directory (:func:`check_program_destination`); files and directories get the user's umask."""
        directory = Path(directory)
        self.validate()
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_name": self.model_name,
            "arch": self.arch.to_dict(),
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "tiles": [{**({"chip": t.chip} if t.chip else {}), "row": t.row, "col": t.col,
                       "config": t.config.to_dict(),
                       **({"later_contexts": [c.to_dict() for c in t.later_contexts]} if t.later_contexts else {}),
                       **({"turns": int(t.turns)} if t.turns != 1 else {})}
                      for t in self.tiles],
            "links": [link.to_dict() for link in self.links],
            **({"replicas": int(self.replicas)} if self.replicas != 1 else {}),  # one copy: the manifest as before
        }
        arrays = {}
        for tile in self.tiles:
            arrays[f"{tile.key}_sram"] = np.ascontiguousarray(tile.sram, dtype=np.int8)
            arrays[f"{tile.key}_params"] = np.ascontiguousarray(tile.params, dtype=np.int64)
        check_program_destination(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
        old = None
        try:
            staging.chmod(0o777 & ~_umask())  # mkdtemp makes mode 700; a program directory follows the umask
            (staging / "program.json").write_text(json.dumps(manifest, indent=1))
            np.savez(staging / "arrays.npz", **arrays)
            if directory.exists():
                old = directory.with_name(staging.name.replace(".partial-", ".replaced-"))
                directory.rename(old)
            staging.rename(directory)
        except BaseException:
            if old is not None and not directory.exists():
                old.rename(directory)
                old = None
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Program":
        directory = Path(directory)
        manifest_path = directory / "program.json"
        if not manifest_path.is_file():
            raise ProgramError(f"'{directory}' is not a flowtile program (no program.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise ProgramError(f"'{manifest_path}' is not valid JSON: {error}") from None
        if manifest.get("format") != FORMAT_NAME:
            raise ProgramError(f"'{manifest_path}' is not a {FORMAT_NAME} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise ProgramError(f"'{manifest_path}' has format version {manifest.get('version')}, "
                               f"this flowtile reads version {FORMAT_VERSION}")
        arrays_path = directory / "arrays.npz"
        try:
            with np.load(arrays_path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            raise ProgramError(f"'{arrays_path}' is unreadable (truncated or not a .npz archive): "
                               f"{type(error).__name__}: {error}") from None

        def tile_array(tile: dict, kind: str, dtype) -> np.ndarray:
            chip = tile.get("chip", 0)
            name = f"{'' if not chip else f'chip{chip}.'}r{tile['row']}c{tile['col']}_{kind}"
            if name not in arrays:
                raise ProgramError(f"'{arrays_path}' has no array '{name}' for a tile that program.json lists")
            return arrays[name].astype(dtype)

        try:
            arch = Arch.from_dict(manifest["arch"], source=str(manifest_path))
            tiles = [TileProgram(t["row"], t["col"], dict(t["config"]), tile_array(t, "sram", np.int8),
                                 tile_array(t, "params", np.int64), chip=int(t.get("chip", 0)),
                                 later_contexts=tuple(dict(c) for c in t.get("later_contexts", ())),
                                 turns=int(t.get("turns", 1)))
                     for t in manifest["tiles"]]
            program = cls(arch=arch,
                          input=TensorSpec.from_dict(manifest["input"]),
                          output=TensorSpec.from_dict(manifest["output"]),
                          layers=[LayerInfo.from_dict(layer) for layer in manifest["layers"]],
                          tiles=tiles, model_name=manifest.get("model_name", ""),
                          links=[LinkProgram.from_dict(link) for link in manifest.get("links", [])],
                          replicas=manifest.get("replicas", 1))
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, (ArchError, ProgramError)):
                raise
            raise ProgramError(f"'{manifest_path}' is malformed: {type(error).__name__}: {error}") from None
        program.validate()
        return program
