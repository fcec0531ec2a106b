"""Shared pytest fixtures, and the Verilator builds started ahead of the tests that need them."""
import gc
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# --- Verilator builds ahead of time --------------------------------------------------------------------------------
#
# On a machine without a build cache (CI) every distinct Verilator design of the suite is 15-60 s of C++ compile
# (about 20 designs), while the tests that need no Verilator keep one of two cores busy. When a run selects the
# Verilator tests (marker ``rtl``) of at least PREBUILD_MIN_FILES files, or FLOWTILE_PREBUILD=1, the tests that need
# no Verilator run first and a background process (flowtile.testing.prebuild, lowest CPU priority) builds the designs
# below meanwhile; the rtl tests then run in their usual order and find their builds done (or wait on the cache's lock
# for the one under way). FLOWTILE_PREBUILD=0: neither. Nothing else changes: a design missing from the list (or one
# whose test changed its Arch) is built by its test as before, only not ahead of time.

PREBUILD_MIN_FILES = 8
#: The suite's Verilator designs, in the order its rtl tests first need them: the Arch fields that differ from
#: ``archs/lean.toml`` (flowtile.testing.archs.lean_arch: the tiles most tests pin; a traced build with "waves";
#: "subprocess": built by a `flowtile` command the test runs). The fuzzer's is added from flowtile.fuzz
#: (tests/test_fuzz.py's slice). pytest_terminal_summary reports where this list drifts.
_L8_S4K = {"lanes": 8, "sram_bytes": 4096, "max_tile_outputs": 64}
_DEFAULT = {"sram_bytes": 65536, "tile_contexts": 8}     # the built-in default Arch, against archs/lean.toml
PREBUILD_DESIGNS = [
    {"arch": {"lanes": 4, "sram_bytes": 2048, "max_tile_outputs": 8}},                    # test_channel_groups
    {"arch": {}},                                                                          # lean 4x4: many
    {"arch": _DEFAULT},                                                                    # test_default_arch
    {"arch": {**_DEFAULT, "rows": 2, "cols": 2}, "waves": True, "subprocess": True},       # test_cli, --waves
    {"arch": {"rows": 1, "cols": 2, "sram_bytes": 8192, "max_tile_outputs": 64, "result_ring_words": 16,
              "tile_contexts": 3}},                                                        # test_contexts
    {"arch": {"rows": 2, "cols": 2, "sram_bytes": 8192, "max_tile_outputs": 64, "result_ring_words": 16,
              "tile_contexts": 4}},                                                        # test_contexts
    {"arch": {"rows": 2, "cols": 3, "lanes": 4, "sram_bytes": 16384, "router_fifo_depth": 2,
              "max_tile_outputs": 256, "host_buffer_flits": 8192}},                        # test_differential, ...
    {"arch": {"rows": 3, "cols": 2, "lanes": 16, "sram_bytes": 65536, "router_fifo_depth": 1,
              "max_tile_outputs": 320, "host_buffer_flits": 4096}},                        # test_differential
    None,                                                                                  # test_fuzz (its pool)
    {"arch": {"rows": 2, "cols": 2}},                                                      # test_large_windows
    {"arch": {**_L8_S4K, "rows": 2, "cols": 2, "chips": 2, "link_latency_cycles": 16, "link_frame_flits": 4,
              "router_fifo_depth": 1, "link_error_rate": 0.004, "link_burst_cycles": 2,
              "link_error_seed": 4}},                                                      # test_multichip_faults_rtl
    {"arch": {**_L8_S4K, "rows": 1, "cols": 2, "chips": 4, "link_frame_flits": 4, "link_bits_per_cycle": 1,
              "link_replay_frames": 2, "link_credit_frames": 2, "link_error_rate": 0.0005,
              "link_burst_cycles": 3, "link_error_seed": 12}},                             # test_multichip_faults_rtl
    {"arch": {**_L8_S4K, "rows": 2, "cols": 2, "chips": 2, "link_latency_cycles": 16,
              "link_error_rate": 0.0003, "link_error_seed": 5}},                           # test_multichip_faults_rtl
    {"arch": {**_L8_S4K, "rows": 2, "cols": 2, "chips": 2, "result_ring_words": 8, "link_latency_cycles": 16,
              "link_frame_flits": 4}},                                                     # test_multichip_rtl, ...
    {"arch": {**_L8_S4K, "rows": 1, "cols": 2, "chips": 4, "result_ring_words": 8, "link_bits_per_cycle": 1,
              "link_replay_frames": 2, "link_credit_frames": 2}},                          # test_multichip_rtl
    {"arch": {**_L8_S4K, "rows": 2, "cols": 2, "chips": 2, "chip_topology": "ring", "result_ring_words": 8,
              "link_latency_cycles": 16, "link_frame_flits": 4}},                          # test_ring_topology
    {"arch": {**_L8_S4K, "rows": 2, "cols": 2, "chips": 3, "chip_topology": "ring", "result_ring_words": 8,
              "link_latency_cycles": 16, "link_frame_flits": 4, "link_error_rate": 0.001,
              "link_error_seed": 2}},                                                      # test_ring_topology
    {"arch": {"rows": 2, "cols": 2, "lanes": 4, "sram_bytes": 1024, "max_tile_outputs": 16, "result_ring_words": 4,
              "host_buffer_flits": 256}},                                                  # test_rtl_flow, watchdog
    {"arch": {"rows": 2, "cols": 2, "lanes": 4, "sram_bytes": 512, "max_tile_outputs": 64, "result_ring_words": 16,
              "router_fifo_depth": 2, "host_buffer_flits": 256}},                          # test_rtl_flow
]


def _prebuild_wanted(rtl_files: set) -> bool:
    setting = os.environ.get("FLOWTILE_PREBUILD", "")
    if setting in ("0", "1"):
        return setting == "1"
    return len(rtl_files) >= PREBUILD_MIN_FILES


def _designs() -> list[dict]:
    from flowtile.testing.archs import lean_arch
    designs = []
    for design in PREBUILD_DESIGNS:
        if design is None:
            from flowtile.fuzz import arch_pool
            design = {"arch": arch_pool(1, 1)[0].to_dict()}
        else:
            design = {**design, "arch": lean_arch(**design["arch"]).to_dict()}
        designs.append(design)
    return designs


@pytest.hookimpl(trylast=True)      # after -m / -k / --deselect have deselected theirs
def pytest_collection_modifyitems(session, config, items):
    rtl = [item for item in items if item.get_closest_marker("rtl") is not None]
    if not rtl or config.option.collectonly or not _prebuild_wanted({item.path for item in rtl}):
        return
    rtl_ids = {id(item) for item in rtl}
    items[:] = [item for item in items if id(item) not in rtl_ids] + rtl
    from flowtile.rtl.simulate import DEFAULT_BUILD_ROOT
    env = dict(os.environ, AMARANTH_USE_YOSYS=os.environ.get("AMARANTH_USE_YOSYS", "builtin"))
    DEFAULT_BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(DEFAULT_BUILD_ROOT / "prebuild.log", "w") as log:     # its progress lines (the last run's)
        config._flowtile_prebuild = subprocess.Popen(
            [sys.executable, "-m", "flowtile.testing.prebuild", json.dumps(_designs())], cwd=ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=lambda: os.nice(19))
    config._flowtile_prebuild_full = len({item.path for item in rtl}) >= PREBUILD_MIN_FILES
    _record_builds(config)


def _record_builds(config) -> None:
    """Keep the list above honest: note every design the tests build in this process (into the default cache), and
    whether it was there already, for :func:`pytest_terminal_summary`."""
    from flowtile.rtl import simulate
    original, builds = simulate.build_verilator, []
    config._flowtile_builds = builds

    def recording(arch, *args, **kwargs):
        build = original(arch, *args, **kwargs)
        if kwargs.get("build_root") is None and kwargs.get("chip_factory") is None:
            builds.append((json.dumps(arch.to_dict(), sort_keys=True), bool(kwargs.get("waves")), build.cached))
        return build
    simulate.build_verilator = recording


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With the builds ahead of time on: the designs tests built themselves (missing from PREBUILD_DESIGNS, or listed
    with other fields) and the listed designs no test used (stale), so that the list is fixed where it drifts."""
    builds = getattr(config, "_flowtile_builds", None)
    if builds is None:
        return
    from flowtile.testing.archs import lean_arch
    defaults = lean_arch().to_dict()

    def fields(arch: str) -> str:   # what differs from archs/lean.toml, as PREBUILD_DESIGNS writes it
        return json.dumps({k: v for k, v in json.loads(arch).items() if defaults.get(k) != v})
    # the fuzzer's design (None in the list) is built in its Dask workers, and test_cli's ("subprocess") by the
    # flowtile command: this process does not see those builds
    listed = {(json.dumps(lean_arch(**d["arch"]).to_dict(), sort_keys=True), bool(d.get("waves")))
              for d in PREBUILD_DESIGNS if d is not None and not d.get("subprocess")}
    used = {(arch, waves) for arch, waves, _ in builds}
    for arch, waves in sorted({(arch, waves) for arch, waves, cached in builds if not cached} - listed):
        terminalreporter.write_line(f"prebuild: a test built a design that PREBUILD_DESIGNS (tests/conftest.py) "
                                    f"does not list: {fields(arch)}{' with waves' if waves else ''}")
    if config._flowtile_prebuild_full:   # the whole suite's rtl tests (about): what none of them used is stale
        for arch, waves in sorted(listed - used):
            terminalreporter.write_line(f"prebuild: no test used the listed design {fields(arch)}"
                                        f"{' with waves' if waves else ''} (stale?)")


def pytest_unconfigure(config):
    process = getattr(config, "_flowtile_prebuild", None)
    if process is not None and process.poll() is None:
        # its own session: the Verilator and make processes under it go too
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.fixture
def collect_unused_components():
    """Validation tests build Amaranth components that raise or are never elaborated, on purpose:
    collect them while Amaranth's "created but never used" warning is silenced."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


@pytest.fixture(scope="session")
def digits_program(tmp_path_factory):
    """models/digits_mlp.onnx compiled by ``flowtile compile`` for ``archs/lean.toml`` (one copy, one layer a tile)
    into a program directory (read it, copy it to edit)."""
    from flowtile import cli
    path = tmp_path_factory.mktemp("digits") / "prog"
    assert cli.main(["compile", str(ROOT / "models" / "digits_mlp.onnx"), "--arch", str(ROOT / "archs" / "lean.toml"),
                     "-o", str(path)]) == 0
    return path


@pytest.fixture
def digits_inputs(tmp_path):
    """The first two samples of models/digits_test.npz saved as ``tmp_path / "x.npy"``; returns that path."""
    import numpy as np
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:2])
    return tmp_path / "x.npy"
