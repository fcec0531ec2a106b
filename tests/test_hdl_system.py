"""The multi-chip System (hdl/system.py) in Amaranth's simulator: chips in a line joined by links, loaded by hand
with a pass-through program (every tile passes N flits a inference to its chain successor, the last tile of each
chip to the host port addressed to tile (0, 0)); flits streamed in come out unchanged and in order under seeded
random output stalls, and every link meets the cycle-exact timing contract of flowtile/link_format.py
(tests/test_hdl_link.py's check_link_contract). Also: the load bus's chip field and link registers, the Verilog
form (one tile module, one link module, Verilator lint) and parameter validation."""
import random
import re

import pytest
from amaranth.hdl import Fragment, Instance
from amaranth.sim import Simulator

from flowtile.arch import CONFIG_FIELDS, Arch, index_bits
from flowtile.testing.archs import lean_arch
from flowtile.hdl.chip import TILE_MODULE_NAME
from flowtile.hdl.layouts import (LINK_INFERENCE_FLITS_BITS, LINK_REG_LANE_SEGMENT0, LOAD_TARGET_CONFIG,
                                  LOAD_TARGET_LINK, LoadEncodingError, encode_config, load_chip_bits, load_layout,
                                  pack_link_load, pack_link_segment_load, pack_load)
from flowtile.hdl.link import LinkFormat, lfsr_seed, ret_seed
from flowtile.hdl.system import (LINK_MODULE_NAME, LINK_STATUS_COUNTERS, System, link_seed,
                                 link_status_signature)
from flowtile.hdl.verilog import link_verilog, system_verilog
from flowtile.link_format import LINK_LANE_SEGMENTS, LaneSegment, encode_lane_segment
from flowtile.testing.program_builder import config_with_queue
from test_hdl_link import LinkProbe, check_link_contract, stream_lanes, table_value

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]

#: Two chips of 1x2 tiles with 19-bit flits (16 data bits cross a link); an 8-bit link wire (13-beat frames, 3-beat
#: messages), small credit and replay windows so that both bind.
ARCH = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4, result_ring_words=2, router_fifo_depth=2,
                 chips=2, link_bits_per_cycle=8, link_latency_cycles=3, link_frame_flits=4, link_credit_frames=2,
                 link_replay_frames=2)


def blank_config(**values):
    config = {name: 0 for name, _, _ in CONFIG_FIELDS}
    config.update(clamp_lo=-128, clamp_hi=127)
    config.update(values)
    return config


def pass_through_program(arch, n_pass, last_dest=(0, 0), link_dest=(0, 0)):
    """{(chip, row, col): config}: every tile passes ``n_pass`` flits an inference to its chain successor (through a
    forward queue of all its SRAM words, as a compiled program's pass-through tile); the last tile of each chip sends
    to the host port with dest ``link_dest`` ((0, 0): the next chip's first tile, the only valid program; the
    destination does not cross the link), the last chip's with dest ``last_dest`` (seen in the output flits)."""
    configs = {}
    for chip in range(arch.chips):
        chain = arch.chain
        for position, (row, col) in enumerate(chain):
            if position + 1 < len(chain):
                dest = dict(dest_row=chain[position + 1][0], dest_col=chain[position + 1][1])
            else:
                target = last_dest if chip == arch.chips - 1 else link_dest
                dest = dict(dest_host=1, dest_row=target[0], dest_col=target[1])
            configs[chip, row, col] = config_with_queue(blank_config(n_pass=n_pass, **dest), arch)
    return configs


async def load(ctx, dut, **fields):
    ctx.set(dut.load.valid, 1)
    ctx.set(dut.load.payload, fields)
    await ctx.tick()
    ctx.set(dut.load.valid, 0)


async def load_program(ctx, dut, arch, configs, inference_flits, segments=()):
    """Configs of the last chip first (so a write leaking into a later chip would be overwritten visibly), then
    the link registers (``segments``: every link's lane table, written whole, unused entries 0, as
    rtl/simulate.py loads them)."""
    for (chip, row, col), config in sorted(configs.items(), reverse=True):
        for addr, value in encode_config(arch, config):
            await load(ctx, dut, chip=chip, tile=row * arch.cols + col, target=LOAD_TARGET_CONFIG, addr=addr,
                       data=value)
    padded = list(segments) + [None] * (LINK_LANE_SEGMENTS - len(segments))
    for k in range(arch.chips - 1):
        await load(ctx, dut, chip=k, tile=0, target=LOAD_TARGET_LINK, addr=0, data=inference_flits)
        for index, segment in enumerate(padded):
            await load_word(ctx, dut, pack_link_segment_load(arch, k, index, segment))


async def load_word(ctx, dut, word):
    """One load-bus write of a packed payload (:func:`pack_load` and friends)."""
    ctx.set(dut.load.valid, 1)
    ctx.set(dut.load.payload.as_value(), word)
    await ctx.tick()
    ctx.set(dut.load.valid, 0)


def run_system(arch, n_pass, inferences, *, out_stall, in_stall=0.0, seed=0, max_cycles=6000, link_dest=(0, 0),
               segments=()):
    """Load the pass-through program (every link with lane table ``segments``), run, stream ``n_pass *
    inferences`` random flits in (seeded input gaps) and take them from the host output (seeded random ready
    stalls) until all came out, then ``tail`` more cycles.
    Returns ``(sent, received, probes, status)``: the data words, the output flits as dicts, a
    :class:`LinkProbe` per link (cycle 0 = first cycle with run = 1) and each link's status members at the end."""
    rng = random.Random(seed)
    dut = System(arch)
    fmt = dut.format
    total = n_pass * inferences
    sent = [rng.getrandbits(arch.flit_data_bits) for _ in range(total)]
    received, status = [], []
    probes = [LinkProbe(link) for link in dut.links]
    tail = fmt.message_delay + 2 * fmt.ret_beats
    last_dest = (0, arch.cols - 1)

    async def testbench(ctx):
        await load_program(ctx, dut, arch, pass_through_program(arch, n_pass, last_dest, link_dest), n_pass,
                           segments)
        ctx.set(dut.run, 1)
        index, cycle, extra, valid = 0, 0, 0, False
        while len(received) < total or extra < tail:
            assert cycle < max_cycles, f"system stopped: {len(received)} of {total} flits out"
            extra += len(received) == total
            if not valid and index < total and rng.random() >= in_stall:
                valid = True
                ctx.set(dut.i_host.payload, {"data": sent[index], "dest_row": 0, "dest_col": 0, "dest_host": 0})
            ctx.set(dut.i_host.valid, valid)
            took = valid and ctx.get(dut.i_host.ready)
            ready = rng.random() >= out_stall
            ctx.set(dut.o_host.ready, ready)
            if ready and ctx.get(dut.o_host.valid):
                payload = ctx.get(dut.o_host.payload)
                received.append({name: int(payload[name]) for name in ("data", "dest_row", "dest_col", "dest_host")})
            for probe in probes:
                probe.sample(ctx)
            await ctx.tick()
            cycle += 1
            if took:
                index, valid = index + 1, False
        for k in range(arch.chips - 1):
            member = getattr(dut, f"link{k}")
            status.append({name: ctx.get(getattr(member, name)) for name in member.signature.members})
            assert ctx.get(dut.links[k].seed) == link_seed(arch.link_error_seed, k)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return sent, received, probes, status


# --- flits through the system, and the timing contract of every link -----------------------------------------------
def test_only_data_crosses_a_link():
    """Chip 0's exit tile addresses tile (0,1) of chip 1 (a program Program.validate refuses): the destination does
    not cross the wire: the link's receiver delivers every flit addressed to chip 1's tile (0,0) (dest_row =
    dest_col = dest_host = 0), and the data flows through chip 1's chain."""
    sent, received, probes, status = run_system(ARCH, 5, 2, out_stall=0.3, seed=3, link_dest=(0, 1))
    assert [flit["data"] for flit in received] == sent
    delivered = [cycle["o_dest"] for cycle in probes[0].cycles if cycle["o_valid"] and cycle["o_ready"]]
    assert delivered == [(0, 0, 0)] * len(sent)
    assert status[0]["rx_frames_accepted"] == 2 * LinkFormat(ARCH).frames(5)


@pytest.mark.parametrize("arch, n_pass, inferences, out_stall", [
    (ARCH, 5, 4, 0.5),                                            # frames 4 + 1 per inference
    (ARCH.replace(rows=2, cols=2, link_frame_flits=3), 6, 2, 0.3),  # 2x2 chips, frames 3 + 3
    (ARCH.replace(rows=1, cols=1, chips=3, link_latency_cycles=1), 3, 3, 0.6),  # two links, frames of 3
], ids=["1x2x2", "2x2x2", "1x1x3"])
def test_flits_cross_the_links_in_order_and_on_the_contracts_cycles(arch, n_pass, inferences, out_stall):
    sent, received, probes, status = run_system(arch, n_pass, inferences, out_stall=out_stall, in_stall=0.2,
                                                seed=n_pass)
    assert [flit["data"] for flit in received] == sent
    # The last chip's last tile addresses its output to the host with dest (0, cols - 1), from its own registers
    # (loaded first): the writes to the other chips (dest (0, 0)) did not reach it.
    assert all((flit["dest_host"], flit["dest_row"], flit["dest_col"]) == (1, 0, arch.cols - 1) for flit in received)
    fmt = LinkFormat(arch)
    frames = inferences * fmt.frames(n_pass)
    for k, (probe, link) in enumerate(zip(probes, status)):
        stats = check_link_contract(fmt, n_pass, probe.cycles)
        assert stats["frames"] == frames == link["tx_frames_sent"] == link["rx_frames_accepted"], k
        assert link["inference_flits"] == n_pass
        assert link["tx_ack"] == link["tx_freed"] == frames % (1 << fmt.seq_bits)
        assert all(link[name] == 0 for name in LINK_STATUS_COUNTERS
                   if name not in ("tx_frames_sent", "rx_frames_accepted")), link


def test_contract_binds_window_and_credit_in_the_system():
    """The 1x2 system with a stalled host output: both the credit rule and the replay window decide some cycles."""
    _, received, probes, _ = run_system(ARCH, 8, 3, out_stall=0.8, seed=3)
    assert len(received) == 24
    stats = check_link_contract(LinkFormat(ARCH), 8, probes[0].cycles)
    assert stats["credit_bound"] > 0 and stats["window_bound"] > 0


def test_bit_errors_on_the_link_still_deliver_every_flit_once_in_order():
    # (the injector counts run cycles: flowtile/link_faults.py; seed 78 corrupts frames in this short run)
    arch = ARCH.replace(link_error_rate=0.003, link_error_seed=78)
    sent, received, _, status = run_system(arch, 5, 3, out_stall=0.3, seed=4, max_cycles=20000)
    assert [flit["data"] for flit in received] == sent
    assert status[0]["fwd_flips"] > 0 and status[0]["tx_frames_sent"] > status[0]["rx_frames_accepted"]
    assert status[0]["rx_overflows"] == 0


def test_lane_tables_on_the_links():
    """Every link loaded with the same lane table over the load bus: each flit comes out with only its carried
    lanes (the others zero, whichever link dropped them), the frames are the dense ones (fewer than without the
    table) and every link still meets the timing contract on its cycles."""
    arch = ARCH.replace(rows=1, cols=1, chips=3, lanes=4, sram_bytes=64, link_frame_flits=2)
    segments = (LaneSegment(4, 2, 1), LaneSegment(3, 1, 3))
    n_pass, inferences = 9, 3
    sent, received, probes, status = run_system(arch, n_pass, inferences, out_stall=0.4, in_stall=0.2, seed=9,
                                                segments=segments)
    carried = stream_lanes(n_pass, len(sent), arch.lanes, segments)
    assert [flit["data"] for flit in received] == [word & ((1 << 8 * c) - 1) for word, c in zip(sent, carried)]
    fmt = LinkFormat(arch)
    frames = inferences * fmt.frames(n_pass, segments)
    assert fmt.frames(n_pass, segments) < fmt.frames(n_pass)
    for probe, link in zip(probes, status):
        stats = check_link_contract(fmt, n_pass, probe.cycles, segments)
        assert stats["frames"] == frames == link["tx_frames_sent"] == link["rx_frames_accepted"]


# --- the load bus: chip field and link registers ------------------------------------------------------------------
def test_load_layout_chip_field_is_on_top_and_moves_nothing():
    for chips in (1, 2, 3, 5, 256):
        arch = lean_arch(rows=3, cols=5, lanes=4, chips=chips)
        layout = load_layout(arch)
        assert [name for name, _ in layout] == ["tile", "target", "addr", "data", "chip"]
        assert load_chip_bits(arch) == index_bits(chips) == layout["chip"].shape.width
        assert layout["chip"].offset == layout["data"].offset + layout["data"].shape.width
        assert (layout["tile"].offset, layout["target"].offset, layout["addr"].offset, layout["data"].offset) == \
            (0, 4, 6, 22)
        assert layout.size == 22 + 69 + index_bits(chips)
    arch = lean_arch(chips=3)
    word = pack_load(arch, tile=5, target=LOAD_TARGET_LINK, addr=0, data=9, chip=2)
    assert word >> load_layout(arch)["chip"].offset == 2
    assert pack_link_load(arch, 1, 1234) == pack_load(arch, 0, LOAD_TARGET_LINK, 0, 1234, chip=1)
    ring = arch.replace(chip_topology="ring")   # the return link is link chips - 1
    assert pack_link_load(ring, 2, 77) == pack_load(ring, 0, LOAD_TARGET_LINK, 0, 77, chip=2)


@pytest.mark.parametrize("arch, chip, flits, message", [
    (lean_arch(chips=3), 2, 5, "'link chip' = 2 is out of range 0..1"),
    (lean_arch(chips=3, chip_topology="ring"), 3, 5, "'link chip' = 3 is out of range 0..2"),
    (lean_arch(chips=2), 0, 1 << LINK_INFERENCE_FLITS_BITS, "'link register inference_flits' = 16777216 is out of range"),
    (lean_arch(chips=2), 0, -1, "'link register inference_flits' = -1 is out of range"),
    (lean_arch(), 0, 5, "arch has 1 chip, so no link to load"),
])
def test_pack_link_load_rejects_what_does_not_fit(arch, chip, flits, message):
    with pytest.raises(LoadEncodingError, match=re.escape(message)):
        pack_link_load(arch, chip, flits)


def test_link_registers_load_only_at_addr_0_of_an_existing_link_while_not_running():
    arch = ARCH.replace(chips=3, rows=1, cols=1)
    dut = System(arch)
    seen = []

    async def testbench(ctx):
        await load(ctx, dut, chip=0, tile=0, target=LOAD_TARGET_LINK, addr=0, data=(1 << 30) | 77)
        await load(ctx, dut, chip=1, tile=0, target=LOAD_TARGET_LINK, addr=0, data=12)
        await load(ctx, dut, chip=1, tile=0, target=LOAD_TARGET_LINK, addr=LINK_REG_LANE_SEGMENT0 + LINK_LANE_SEGMENTS,
                   data=99)                                                                 # unknown register
        await load(ctx, dut, chip=2, tile=0, target=LOAD_TARGET_LINK, addr=0, data=98)   # no link leaves chip 2
        await load(ctx, dut, chip=3, tile=0, target=LOAD_TARGET_LINK, addr=0, data=97)   # no chip 3
        await load(ctx, dut, chip=0, tile=0, target=LOAD_TARGET_CONFIG, addr=0, data=96)  # a tile's register
        seen.append((ctx.get(dut.link0.inference_flits), ctx.get(dut.link1.inference_flits)))
        ctx.set(dut.run, 1)
        await load(ctx, dut, chip=0, tile=0, target=LOAD_TARGET_LINK, addr=0, data=5)    # running: ignored
        seen.append((ctx.get(dut.link0.inference_flits), ctx.get(dut.link1.inference_flits)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert seen == [(77, 12), (77, 12)]


def test_lane_segment_registers_load_over_the_bus():
    """addr LINK_REG_LANE_SEGMENT0 + s of link k sets entry s of its lane table (the encoded segment; both its
    sender and receiver see it) from the next cycle, only while run = 0; other chips, links and addresses are
    ignored, a register can be cleared again, and the high bits of data beyond the entry are dropped."""
    arch = ARCH.replace(chips=3, rows=1, cols=1, lanes=4, sram_bytes=64)
    dut = System(arch)
    a, b, c = LaneSegment(7, 3, 2), LaneSegment(100, 1, 4), LaneSegment((1 << 24) - 1, (1 << 16) - 1, 1)
    entry = dut.links[0].segments.shape().elem_shape.size
    seen = []

    def tables(ctx):
        """Per link: the table at its port, its sender's and its receiver's."""
        return tuple(tuple(ctx.get(view.as_value()) for view in (link.segments, link.tx.segments, link.rx.segments))
                     for link in dut.links)

    async def testbench(ctx):
        assert tables(ctx) == ((0, 0, 0), (0, 0, 0))            # all 0 after reset
        await load_word(ctx, dut, pack_link_segment_load(arch, 0, 0, a))
        await load_word(ctx, dut, pack_link_segment_load(arch, 0, 3, c))
        await load_word(ctx, dut, pack_link_segment_load(arch, 1, 1, b))
        await load_word(ctx, dut, pack_link_segment_load(arch, 1, 2, a))
        await load_word(ctx, dut, pack_link_segment_load(arch, 1, 2, None))      # cleared again
        # no link leaves chip 2; addr past the table; a tile's target; high data bits beyond the entry
        await load(ctx, dut, chip=2, tile=0, target=LOAD_TARGET_LINK, addr=LINK_REG_LANE_SEGMENT0, data=5)
        await load(ctx, dut, chip=0, tile=0, target=LOAD_TARGET_LINK, addr=LINK_REG_LANE_SEGMENT0 + LINK_LANE_SEGMENTS,
                   data=6)
        await load(ctx, dut, chip=0, tile=0, target=LOAD_TARGET_CONFIG, addr=LINK_REG_LANE_SEGMENT0 + 1, data=7)
        await load(ctx, dut, chip=1, tile=0, target=LOAD_TARGET_LINK, addr=LINK_REG_LANE_SEGMENT0 + 3,
                   data=(1 << 60) | encode_lane_segment(a, arch.lanes))
        seen.append(tables(ctx))
        ctx.set(dut.run, 1)
        await load_word(ctx, dut, pack_link_segment_load(arch, 0, 1, b))         # running: ignored
        seen.append(tables(ctx))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    link0, link1 = table_value(arch, (a, None, None, c)), table_value(arch, (None, b, None, a))
    assert link1 >> (3 * entry) == encode_lane_segment(a, arch.lanes)
    assert seen == [((link0,) * 3, (link1,) * 3)] * 2


def test_link_seeds_differ_per_channel_and_start_from_the_arch_seed():
    assert link_seed(7, 0) == 7 and link_seed(7, 3) == 13
    assert link_seed((1 << 32) - 1, 0) == (1 << 32) - 1 and link_seed((1 << 32) - 1, 1) == 2
    seeds = [s for k in range(100) for s in (link_seed(5, k), ret_seed(link_seed(5, k)))]
    assert len(set(seeds)) == len(seeds) and all(1 <= s < (1 << 32) for s in seeds)
    assert lfsr_seed(link_seed(5, 1), 0) != lfsr_seed(link_seed(5, 0), 0)


# --- structure and Verilog ------------------------------------------------------------------------------------------
def test_system_ports_are_the_chips_plus_link_status():
    dut = System(ARCH.replace(chips=3))
    names = list(dut.signature.members)
    assert names == ["load", "run", "i_host", "o_host", "link0", "link1"]
    assert dut.signature.members["link0"].signature == link_status_signature(dut.format)
    assert len(dut.chips) == 3 and len(dut.links) == 2
    single = System(ARCH.replace(chips=1))
    assert list(single.signature.members) == ["load", "run", "i_host", "o_host"] and single.links == []


def test_instance_form_has_one_link_instance_per_link():
    arch = ARCH.replace(chips=3)
    fragment = Fragment.get(System(arch, tiles="instances", link_module="my_link"), None)
    links = [sub for sub, _name, _src in fragment.subfragments if isinstance(sub, Instance)]
    assert [link.type for link in links] == ["my_link", "my_link"]


@pytest.fixture(scope="module")
def three_chip_verilog():
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4, result_ring_words=2, chips=3,
                     link_latency_cycles=2, link_error_rate=0.01)
    return arch, system_verilog(arch, quiet=True)


def test_system_verilog_writes_one_tile_and_one_link_module(three_chip_verilog):
    arch, text = three_chip_verilog
    modules = re.findall(r"^module (\S+?)\(", text, re.M)
    assert modules.count(TILE_MODULE_NAME) == 1 and modules.count(LINK_MODULE_NAME) == 1
    assert "flowtile_system" in modules
    assert len(re.findall(rf"^\s*{TILE_MODULE_NAME} \S+ \(", text, re.M)) == arch.chips * arch.n_tiles
    assert len(re.findall(rf"^\s*{LINK_MODULE_NAME} \S+ \(", text, re.M)) == arch.chips - 1
    for port in ("load__payload", "run", "i_host__ready", "o_host__payload", "link1__tx_frames_sent",
                 "link0__inference_flits", "link0__tx_ack"):
        assert re.search(rf"\b(input|output)\b[^;]*\b{port}\b", text), port
    # A one-chip system needs no link module.
    single = system_verilog(ARCH.replace(chips=1), quiet=True)
    assert LINK_MODULE_NAME not in single


def test_system_verilog_lints_clean(tmp_path, three_chip_verilog):
    from test_verilog_lint import _lint
    _lint(tmp_path, three_chip_verilog[1], "flowtile_system")


def test_link_module_lints_clean(tmp_path):
    from test_verilog_lint import _lint
    _lint(tmp_path, link_verilog(ARCH.replace(link_error_rate=0.01)), LINK_MODULE_NAME)


# --- parameter validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    ({"arch": "2x2"}, TypeError, "System: parameter 'arch' must be a flowtile.arch.Arch"),
    ({"arch": ARCH, "tiles": "flat"}, ValueError,
     "System: parameter 'tiles' must be one of 'submodules', 'instances', got 'flat'"),
    ({"arch": ARCH, "tile_module": "a tile"}, ValueError,
     "System: parameter 'tile_module' must be a Verilog identifier, got 'a tile'"),
    ({"arch": ARCH, "link_module": "1link"}, ValueError,
     "System: parameter 'link_module' must be None or a Verilog identifier, got '1link'"),
    ({"arch": ARCH, "link_module": TILE_MODULE_NAME}, ValueError,
     "System: parameters 'link_module' and 'tile_module' must differ, both are 'flowtile_tile'"),
])
def test_system_parameter_validation(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        System(**kwargs)


@pytest.mark.parametrize("call, message", [
    (lambda: system_verilog(ARCH, name=LINK_MODULE_NAME), "system_verilog: parameter 'name' must differ from"),
    (lambda: system_verilog(ARCH, name="a b"), "system_verilog: parameter 'name' must be a Verilog identifier"),
    (lambda: system_verilog("arch"), "system_verilog: parameter 'arch' must be a flowtile.arch.Arch"),
    (lambda: link_verilog(ARCH, name="9"), "link_verilog: parameter 'name' must be a Verilog identifier, got '9'"),
])
def test_system_verilog_parameter_validation(call, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        call()
