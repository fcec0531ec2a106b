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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arch import ACTIVATION_BANKS, ADD_MULT_MAX, OP_ADD, OP_CONCAT, OP_LANE, OP_MAC, OP_MAX, Arch, ArchError, CONFIG_FIELDS

__all__ = ["Program", "TileProgram", "TensorSpec", "LayerInfo", "ProgramError", "FORMAT_VERSION",
           "output_pixels", "weight_words", "result_words", "compute_issue_cycles", "stored_words", "forwarded_words", "operand_words",
           "channel_preserving", "tile_period_cycles", "result_word_issue_cycles",
           "output_pixel_positions", "check_program_destination"]

FORMAT_NAME = "flowtile-program"
FORMAT_VERSION = 6


def output_pixels(config: dict) -> int:
    """``n_pix`` of section 4.1: ``out_rows`` rows of ``out_width`` pixels, less the first row's columns before
    ``out_col_begin`` and the last row's from ``out_col_end`` (0 meaning ``out_width``) on."""
    width = config["out_width"]
    end = config.get("out_col_end", 0) or width
    return config["out_rows"] * width - config.get("out_col_begin", 0) - (width - end)


def output_pixel_positions(config: dict) -> list[tuple[int, int]]:
    """The ``(oy, ox)`` of a tile's output pixels in order (section 4.1), ``oy`` counting from ``out_row_begin``."""
    width, rows = config["out_width"], config["out_rows"]
    begin, end = config.get("out_col_begin", 0), config.get("out_col_end", 0) or width
    return [(config["out_row_begin"] + r, x) for r in range(rows)
            for x in range(begin if r == 0 else 0, end if r == rows - 1 else width)]


def stored_words(config: dict) -> int:
    """RECV words a tile writes into its activation region per inference (section 4.2)."""
    return max(0, config["store_end"] - config["store_begin"])


def forwarded_words(config: dict) -> int:
    """RECV words a tile re-emits downstream per inference (section 4.2)."""
    return max(0, config["forward_end"] - config["forward_begin"])


def channel_preserving(config: dict) -> bool:
    """MAX, LANE, ADD and CONCAT compute one result word per (pixel, word): ``n_out = CW * L``."""
    return config["op"] in (OP_MAX, OP_LANE, OP_ADD, OP_CONCAT)


def weight_words(config: dict) -> int:
    """SRAM words of weights a tile's registers imply (docs/architecture.md section 4.1)."""
    if not config["n_out"] or config["op"] in (OP_MAX, OP_ADD, OP_CONCAT):
        return 0
    if config["op"] == OP_LANE:
        return config["kernel_h"] * config["kernel_w"] * config["words_per_pixel"]
    return config["n_out"] * config["kernel_h"] * config["kernel_w"] * config["words_per_pixel"]


def result_words(config: dict, lanes: int) -> int:
    """Flits a tile emits from its result buffer per inference (``n_pix * N_r``)."""
    return output_pixels(config) * -(-config["n_out"] // lanes) if config["n_out"] else 0


def compute_issue_cycles(config: dict) -> int:
    """COMPUTE issue cycles per inference (``I`` of section 4.1; COMPUTE lasts ``I + 2``)."""
    if not config["n_out"]:
        return 0
    window = config["kernel_h"] * config["kernel_w"]
    if channel_preserving(config):  # ADD: kernel 1x2, one issue per operand; CONCAT: 1x1
        return output_pixels(config) * config["words_per_pixel"] * window
    return output_pixels(config) * config["n_out"] * window * config["words_per_pixel"]


def result_word_issue_cycles(config: dict, lanes: int) -> list[int]:
    """Issue cycles ``d`` of each result word of one output pixel, in order (docs/architecture.md section 4,
    result ring): COMPUTE issues a word's cycles back to back and may wait for a ring slot only before a
    word. MAC: ``L * K_w`` per word of ``L`` channels, ``(N_o mod L) * K_w`` for a last word with fewer;
    MAX and LANE: ``KH * KW``; ADD: 2 (its 1x2 operand window); CONCAT: 1. Sums to ``I / n_pix``."""
    if not config["n_out"]:
        return []
    window = config["kernel_h"] * config["kernel_w"]
    if channel_preserving(config):
        return [window] * config["words_per_pixel"]
    per_channel = window * config["words_per_pixel"]
    full, rest = divmod(config["n_out"], lanes)
    return [lanes * per_channel] * full + ([rest * per_channel] if rest else [])


class ProgramError(ValueError):
    """A program directory is missing, malformed, or inconsistent with its arch."""


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


def tile_period_cycles(config: dict, lanes: int) -> int:
    """Cycles per inference of a tile alone in steady state, never stalled (docs/architecture.md section 6,
    rule 4): the busiest of its input side (``K + P`` transfers), its output side (``Q + E``) and its compute
    side (``I + 2`` cycles of COMPUTE; results stream out through the ring while it runs)."""
    n_in, n_pass = config["n_in_words"], config["n_pass"]
    emits = result_words(config, lanes) if config["n_out"] else 0
    compute = compute_issue_cycles(config) + 2 if config["n_out"] else 0
    return max(n_in + n_pass, forwarded_words(config) + n_pass + emits, compute)


def operand_words(config: dict) -> tuple[int, int]:
    """Stored words of the two operand maps of an ADD or CONCAT tile (sections 4.2, 4.3)."""
    pixels = config["in_height"] * config["in_width"]
    if config["op"] == OP_CONCAT:
        return pixels * config["concat_words_a"], pixels * (config["words_per_pixel"] - config["concat_words_a"])
    return (pixels * config["words_per_pixel"],) * 2


def _check_two_operands(key: str, config: dict, stored: int) -> None:
    """The registers of an ADD or CONCAT tile describe two disjoint operand maps inside the stored words."""
    name = "ADD" if config["op"] == OP_ADD else "CONCAT"
    kernel = (1, 2) if config["op"] == OP_ADD else (1, 1)
    if (config["kernel_h"], config["kernel_w"], config["stride"], config["pad_top"], config["pad_left"]) != \
            (*kernel, 1, 0, 0):
        raise ProgramError(f"tile {key}: {name} needs kernel {kernel[0]}x{kernel[1]}, stride 1 and no padding")
    if config["op"] == OP_CONCAT and not 1 <= config["concat_words_a"] < config["words_per_pixel"]:
        raise ProgramError(f"tile {key}: CONCAT register concat_words_a = {config['concat_words_a']} must be in "
                           f"1..words_per_pixel - 1 = {config['words_per_pixel'] - 1}")
    size_a, size_b = operand_words(config)
    a, b = config["operand_a_offset"], config["operand_b_offset"]
    if max(a + size_a, b + size_b) > stored or (a < b + size_b and b < a + size_a):
        raise ProgramError(f"tile {key}: {name} operands of {size_a} and {size_b} words at operand_a_offset = {a} "
                           f"and operand_b_offset = {b} must be disjoint and inside the {stored} stored words")
    if config["out_width"] != config["in_width"] or config["out_row_begin"] + config["out_rows"] > config["in_height"]:
        raise ProgramError(f"tile {key}: {name} output rows {config['out_row_begin']}.."
                           f"{config['out_row_begin'] + config['out_rows'] - 1} x width {config['out_width']} must "
                           f"lie inside the {config['in_height']}x{config['in_width']} map")
    for register in ("add_mult_a", "add_mult_b"):
        if config[register] > ADD_MULT_MAX:
            raise ProgramError(f"tile {key}: register {register} = {config[register]} exceeds "
                               f"ADD_MULT_MAX = {ADD_MULT_MAX}")


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
    #: point, ``ceil(KH*KW*C / L)`` words a pixel.
    layout: str = "flat"
    #: layout "im2col": ``(kernel_h, kernel_w, stride, pad_top, pad_left, out_height, out_width)``
    window: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.layout not in ("flat", "chw", "im2col"):
            raise ProgramError(f"tensor '{self.name}': layout '{self.layout}' is not 'flat', 'chw' or 'im2col'")
        if self.layout in ("chw", "im2col") and len(self.shape) != 3:
            raise ProgramError(f"tensor '{self.name}': layout '{self.layout}' needs a (C, H, W) shape, "
                               f"got {list(self.shape)}")
        if (self.layout == "im2col") != (self.window is not None):
            raise ProgramError(f"tensor '{self.name}': a window is given iff the layout is 'im2col'")
        if self.window is not None and (len(self.window) != 7 or min(self.window) < 0
                                        or min(self.window[:3] + self.window[5:]) < 1):
            raise ProgramError(f"tensor '{self.name}': window {list(self.window)} is not (kernel_h, kernel_w, "
                               f"stride, pad_top, pad_left, out_height, out_width) with positive sizes")

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
        return -(-self.length // lanes)

    def to_dict(self):
        d = {"name": self.name, "shape": list(self.shape), "scale": self.scale,
             "zero_point": self.zero_point, "dtype": self.dtype, "layout": self.layout}
        if self.window is not None:
            d["window"] = list(self.window)
        return d

    @classmethod
    def from_dict(cls, d):
        window = d.get("window")
        return cls(d["name"], tuple(int(s) for s in d["shape"]), float(d["scale"]), int(d["zero_point"]),
                   d.get("dtype", "int8"), d.get("layout", "flat"),
                   tuple(int(v) for v in window) if window is not None else None)


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

    def __post_init__(self):
        if self.mac_count is None:
            object.__setattr__(self, "mac_count", self.n_in * self.n_out)

    @property
    def macs(self) -> int:
        return self.mac_count

    def to_dict(self):
        return {"name": self.name, "op": self.op, "n_in": self.n_in, "n_out": self.n_out,
                "tiles": [list(t) for t in self.tiles], "relu": self.relu, "macs": self.macs}

    @classmethod
    def from_dict(cls, d):
        return cls(d["name"], d["op"], int(d["n_in"]), int(d["n_out"]),
                   tuple(tuple(int(v) for v in t) for t in d["tiles"]), bool(d.get("relu", False)),
                   int(d["macs"]) if "macs" in d else None)


@dataclass
class TileProgram:
    """What one tile is loaded with before a run.

    ``config`` holds every register of :data:`flowtile.arch.CONFIG_FIELDS`; ``sram`` is the SRAM image
    from word 0 (int8 values, shape ``[words, lanes]``, words beyond it are zero); ``params`` is the
    parameter table, one row per output neuron: ``(bias, multiplier, shift)``.
    """

    row: int
    col: int
    config: dict[str, int]
    sram: np.ndarray = field(repr=False)
    params: np.ndarray = field(repr=False)

    @property
    def key(self) -> str:
        return f"r{self.row}c{self.col}"


@dataclass
class Program:
    arch: Arch
    input: TensorSpec
    output: TensorSpec
    layers: list[LayerInfo]
    tiles: list[TileProgram]          # in chain order: tiles[p] sits at arch.chain_position(p)
    model_name: str = ""

    # --- derived ------------------------------------------------------------------------------
    @property
    def input_words(self) -> int:
        """Flits the host sends per inference."""
        return self.input.words(self.arch.lanes)

    @property
    def output_words(self) -> int:
        """Flits the host receives per inference."""
        return self.output.words(self.arch.lanes)

    @property
    def macs_per_inference(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def validate(self) -> None:
        """Check the program against its arch: register ranges, SRAM and parameter-table sizes."""
        arch = self.arch
        if len(self.tiles) != arch.n_tiles:
            raise ProgramError(f"program has {len(self.tiles)} tiles, arch has {arch.n_tiles}")
        for position, tile in enumerate(self.tiles):
            if (tile.row, tile.col) != arch.chain_position(position):
                raise ProgramError(f"tile {position} is at ({tile.row},{tile.col}), "
                                   f"chain expects {arch.chain_position(position)}")
            for name, bits, signed in CONFIG_FIELDS:
                if name not in tile.config:
                    raise ProgramError(f"tile {tile.key}: config register '{name}' missing")
                value = int(tile.config[name])
                lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
                if not lo <= value <= hi:
                    raise ProgramError(f"tile {tile.key}: config register '{name}' = {value} outside {lo}..{hi}")
            if tile.sram.ndim != 2 or tile.sram.shape[1] != arch.lanes or tile.sram.dtype != np.int8:
                raise ProgramError(f"tile {tile.key}: SRAM image must be int8 [words, {arch.lanes}], "
                                   f"got {tile.sram.dtype} {list(tile.sram.shape)}")
            if tile.sram.shape[0] > arch.sram_words:
                raise ProgramError(f"tile {tile.key}: SRAM image needs {tile.sram.shape[0] * arch.lanes} bytes, "
                                   f"tile has {arch.sram_bytes} (arch field 'sram_bytes')")
            n_out = tile.config["n_out"]
            if tile.config["pass_per_pixel"] and not n_out:
                raise ProgramError(f"tile {tile.key}: pass_per_pixel = {tile.config['pass_per_pixel']} needs a "
                                   f"computing tile (n_out > 0; section 4.4)")
            if tile.params.shape != (n_out, 3):
                raise ProgramError(f"tile {tile.key}: parameter table must be [{n_out}, 3], got {list(tile.params.shape)}")
            if n_out > arch.max_tile_outputs:
                raise ProgramError(f"tile {tile.key}: {n_out} outputs exceed arch field 'max_tile_outputs' "
                                   f"= {arch.max_tile_outputs}")
            config = tile.config
            k = config["n_in_words"]
            for first, last in (("store_begin", "store_end"), ("forward_begin", "forward_end")):
                if not config[first] <= config[last] <= k:
                    raise ProgramError(f"tile {tile.key}: registers {first} = {config[first]}, {last} = "
                                       f"{config[last]} must satisfy {first} <= {last} <= n_in_words = {k}")
            act_end = config["act_base"] + ACTIVATION_BANKS * stored_words(config)
            w_end = config["w_base"] + weight_words(config)
            if max(act_end, w_end) > arch.sram_words:
                raise ProgramError(f"tile {tile.key}: SRAM regions end at word {max(act_end, w_end)}, "
                                   f"tile has {arch.sram_words} words (arch field 'sram_bytes')")
            if n_out:
                pixels = config["in_height"] * config["in_width"] * config["words_per_pixel"]
                stored = stored_words(config)
                if config["op"] in (OP_ADD, OP_CONCAT):
                    _check_two_operands(tile.key, config, stored)
                elif pixels != stored:
                    raise ProgramError(f"tile {tile.key}: {stored} stored words (store_begin..store_end) but "
                                       f"the input map is {config['in_height']}x{config['in_width']}x"
                                       f"{config['words_per_pixel']} = {pixels} words")
                begin, end, width = config["out_col_begin"], config["out_col_end"], config["out_width"]
                if not (begin < width and end <= width and output_pixels(config) >= 1):
                    raise ProgramError(f"tile {tile.key}: output pixel band out_col_begin = {begin}, out_col_end = "
                                       f"{end} over {config['out_rows']} rows of out_width = {width} must satisfy "
                                       f"out_col_begin < out_width, out_col_end <= out_width (0: out_width) and hold "
                                       f">= 1 pixel (section 4.1)")
                interleaved = output_pixels(config) * config["pass_per_pixel"]
                if interleaved > config["n_pass"]:
                    raise ProgramError(f"tile {tile.key}: pass_per_pixel = {config['pass_per_pixel']} over "
                                       f"{output_pixels(config)} output pixels is {interleaved} passed words, more "
                                       f"than n_pass = {config['n_pass']} (section 4.4)")

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
            "tiles": [{"row": t.row, "col": t.col, "config": {k: int(v) for k, v in t.config.items()}}
                      for t in self.tiles],
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
        try:
            arch = Arch.from_dict(manifest["arch"], source=str(manifest_path))
            with np.load(directory / "arrays.npz", allow_pickle=False) as arrays:
                tiles = [TileProgram(t["row"], t["col"], dict(t["config"]),
                                     arrays[f"r{t['row']}c{t['col']}_sram"].astype(np.int8),
                                     arrays[f"r{t['row']}c{t['col']}_params"].astype(np.int64))
                         for t in manifest["tiles"]]
            program = cls(arch=arch,
                          input=TensorSpec.from_dict(manifest["input"]),
                          output=TensorSpec.from_dict(manifest["output"]),
                          layers=[LayerInfo.from_dict(layer) for layer in manifest["layers"]],
                          tiles=tiles, model_name=manifest.get("model_name", ""))
        except (KeyError, TypeError, ValueError, OSError) as error:
            if isinstance(error, (ArchError, ProgramError)):
                raise
            raise ProgramError(f"'{directory}' is a malformed program: {type(error).__name__}: {error}") from None
        program.validate()
        return program
