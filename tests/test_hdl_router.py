"""Router (docs/architecture.md section 3) in Amaranth's simulator against a plain XY golden model."""
import random

import pytest
from amaranth.lib.wiring import In
from amaranth.sim import Simulator

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.hdl.layouts import flit_layout
from flowtile.hdl.router import PORT_ORDER, Router, route_direction

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]


ARCH = lean_arch(rows=3, cols=3, lanes=2, sram_bytes=64, max_tile_outputs=4, router_fifo_depth=2)
CENTRE = (1, 1)


def run_router(arch, row, col, testbench):
    """Simulate one Router with its position ports held at (row, col)."""
    dut = Router(arch)
    sim = Simulator(dut)
    sim.add_clock(1e-6)

    async def bound_testbench(ctx):
        ctx.set(dut.row, row)
        ctx.set(dut.col, col)
        await testbench(ctx, dut)

    sim.add_testbench(bound_testbench)
    sim.run()
    return dut


def flit(dest_row, dest_col, dest_host, data):
    return {"data": data, "dest_row": dest_row, "dest_col": dest_col, "dest_host": dest_host}


def unpack(value):
    return (int(value.data), int(value.dest_row), int(value.dest_col), int(value.dest_host))


def test_golden_xy_route_examples():
    # Columns first, then rows; dest_host goes to the exit tile (2, 2) and leaves by its E port.
    assert route_direction(ARCH, 1, 1, 0, 2, 0) == "E"
    assert route_direction(ARCH, 1, 1, 2, 0, 0) == "W"
    assert route_direction(ARCH, 1, 1, 2, 1, 0) == "S"
    assert route_direction(ARCH, 1, 1, 0, 1, 0) == "N"
    assert route_direction(ARCH, 1, 1, 1, 1, 0) == "L"
    assert route_direction(ARCH, 1, 1, 0, 0, 1) == "E"
    assert route_direction(ARCH, 2, 2, 0, 0, 1) == "E"
    assert route_direction(lean_arch(rows=2, cols=2), 1, 0, 0, 0, 1) == "W"


def test_random_traffic_with_stalls_is_routed_in_order_without_loss():
    rng = random.Random(1234)
    per_input = 40
    destinations = [(r, c, 0) for r in range(ARCH.rows) for c in range(ARCH.cols)] + [(0, 0, 1)]
    # Data are unique tags (input, sequence number), so each flit is identifiable at the outputs.
    offered = {p: [flit(*rng.choice(destinations), data=index * per_input + i)
                   for i in range(per_input)] for index, p in enumerate(PORT_ORDER)}
    valid_pattern = {p: [rng.random() < 0.7 for _ in range(2000)] for p in PORT_ORDER}
    ready_pattern = {p: [rng.random() < 0.6 for _ in range(2000)] for p in PORT_ORDER}
    written = {p: [] for p in PORT_ORDER}      # cycle each input flit was written
    received = {p: [] for p in PORT_ORDER}     # (flit tuple, cycle) per output

    async def testbench(ctx, dut):
        sent = {p: 0 for p in PORT_ORDER}
        total = per_input * len(PORT_ORDER)
        cycle = 0
        while sum(len(v) for v in received.values()) < total:
            assert cycle < 2000, "router stopped delivering flits"
            for p in PORT_ORDER:
                port = dut.input_port(p)
                offering = sent[p] < per_input and valid_pattern[p][cycle]
                ctx.set(port.valid, offering)
                if offering:
                    ctx.set(port.payload, offered[p][sent[p]])
                ctx.set(dut.output_port(p).ready, ready_pattern[p][cycle])
            for p in PORT_ORDER:
                port = dut.input_port(p)
                if ctx.get(port.valid) and ctx.get(port.ready):
                    written[p].append(cycle)
                    sent[p] += 1
                out = dut.output_port(p)
                if ctx.get(out.valid) and ctx.get(out.ready):
                    received[p].append((unpack(ctx.get(out.payload)), cycle))
            await ctx.tick()
            cycle += 1

    run_router(ARCH, *CENTRE, testbench)
    assert sum(len(v) for v in received.values()) == per_input * len(PORT_ORDER)
    assert all(received[p] for p in PORT_ORDER), "every output should carry traffic"
    print("router random traffic cycles:", max(c for v in received.values() for _, c in v))

    # Golden: every flit leaves by its XY port, in order per (input, output) pair, exactly once,
    # no earlier than the cycle after it was written.
    for out_port in PORT_ORDER:
        arrivals = [f for f, _ in received[out_port]]
        expected_multiset = []
        for in_port in PORT_ORDER:
            expected = [(f["data"], f["dest_row"], f["dest_col"], f["dest_host"]) for f in offered[in_port]
                        if route_direction(ARCH, *CENTRE, f["dest_row"], f["dest_col"], f["dest_host"]) == out_port]
            expected_multiset += expected
            from_this_input = [f for f in arrivals if f in set(expected)]
            assert from_this_input == expected, f"order or content differs on {in_port}->{out_port}"
        assert sorted(arrivals) == sorted(expected_multiset), f"loss or duplication on output {out_port}"
    write_cycle = {}
    for in_port in PORT_ORDER:
        for f, cycle in zip(offered[in_port], written[in_port]):
            write_cycle[f["data"]] = cycle
    for out_port in PORT_ORDER:
        for f, cycle in received[out_port]:
            assert cycle >= write_cycle[f[0]] + 1


def test_one_cycle_hop_and_fifo_capacity():
    depth = ARCH.router_fifo_depth
    events = {}

    async def testbench(ctx, dut):
        # A flit written at cycle 0 into the W FIFO, routed E with E ready, leaves at cycle 1.
        ctx.set(dut.o_e.ready, 1)
        ctx.set(dut.i_w.payload, flit(1, 2, 0, 0x55))
        ctx.set(dut.i_w.valid, 1)
        assert ctx.get(dut.i_w.ready)
        assert not ctx.get(dut.o_e.valid)   # not readable in the cycle it is written
        await ctx.tick()
        ctx.set(dut.i_w.valid, 0)
        assert ctx.get(dut.o_e.valid) and ctx.get(dut.i_w.ready)
        assert unpack(ctx.get(dut.o_e.payload)) == (0x55, 1, 2, 0)
        await ctx.tick()
        assert not ctx.get(dut.o_e.valid)
        # With the N output never ready, the S FIFO takes exactly `depth` flits, and a full FIFO
        # is not writable even in the cycle it is read.
        ctx.set(dut.o_n.ready, 0)
        accepted = 0
        for i in range(depth + 3):
            ctx.set(dut.i_s.payload, flit(0, 1, 0, i))
            ctx.set(dut.i_s.valid, 1)
            accepted += ctx.get(dut.i_s.ready)
            await ctx.tick()
        events["accepted"] = accepted
        assert ctx.get(dut.o_n.valid)       # valid does not wait for ready
        ctx.set(dut.o_n.ready, 1)
        assert not ctx.get(dut.i_s.ready)
        await ctx.tick()
        assert ctx.get(dut.i_s.ready)

    run_router(ARCH, *CENTRE, testbench)
    assert events["accepted"] == depth


def test_round_robin_order_starts_at_l_and_moves_past_the_granted_input():
    grants = []

    async def testbench(ctx, dut):
        # Every input sends two flits to this tile's L output (data tags the input).
        for rounds in range(2):
            for index, p in enumerate(PORT_ORDER):
                ctx.set(dut.input_port(p).payload, flit(*CENTRE, 0, 16 * rounds + index))
                ctx.set(dut.input_port(p).valid, 1)
            await ctx.tick()
        for p in PORT_ORDER:
            ctx.set(dut.input_port(p).valid, 0)
        ctx.set(dut.o_l.ready, 1)
        while len(grants) < 2 * len(PORT_ORDER):
            assert ctx.get(dut.o_l.valid)
            grants.append(int(ctx.get(dut.o_l.payload).data))
            await ctx.tick()

    run_router(ARCH, *CENTRE, testbench)
    assert grants == [0, 1, 2, 3, 4, 16, 17, 18, 19, 20]


@pytest.mark.parametrize("arch", [lean_arch(rows=3, cols=4, lanes=2, sram_bytes=64, max_tile_outputs=4),
                                  lean_arch(rows=4, cols=3, lanes=2, sram_bytes=64, max_tile_outputs=4),
                                  lean_arch(rows=1, cols=5, lanes=2, sram_bytes=64, max_tile_outputs=4)],
                         ids=["3x4", "4x3", "1x5"])
def test_position_ports_route_like_the_golden_model_at_every_position(arch):
    """One router stands in for every tile: each destination's flit waits at the head of the L FIFO
    (no output ready) while the position ports sweep all tiles; the valid output must be XY's choice."""
    destinations = [(r, c, 0) for r in range(arch.rows) for c in range(arch.cols)] + [(0, 0, 1)]
    checked = []

    async def testbench(ctx, dut):
        for dest in destinations:
            ctx.set(dut.i_l.payload, flit(*dest, data=1))
            ctx.set(dut.i_l.valid, 1)
            await ctx.tick()
            ctx.set(dut.i_l.valid, 0)
            for row in range(arch.rows):
                for col in range(arch.cols):
                    ctx.set(dut.row, row)
                    ctx.set(dut.col, col)
                    valid = [p for p in PORT_ORDER if ctx.get(dut.output_port(p).valid)]
                    assert valid == [route_direction(arch, row, col, *dest)], (row, col, dest)
                    checked.append((row, col, dest))
            # Drain the flit through the port it is routed to at the last position.
            out = dut.output_port(valid[0])
            ctx.set(out.ready, 1)
            await ctx.tick()
            ctx.set(out.ready, 0)
            assert not any(ctx.get(dut.output_port(p).valid) for p in PORT_ORDER)

    run_router(arch, 0, 0, testbench)
    assert len(checked) == len(destinations) * arch.n_tiles


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "4x4"}, "Router: parameter 'arch' must be a flowtile.arch.Arch"),
    ({"arch": None}, "Router: parameter 'arch' must be a flowtile.arch.Arch"),
])
def test_parameter_validation(kwargs, message):
    with pytest.raises(TypeError, match=message):
        Router(**kwargs)


def test_signature_uses_the_flit_layout_and_position_ports():
    router = Router(ARCH)
    for p in PORT_ORDER:
        assert router.input_port(p).payload.shape() == flit_layout(ARCH)
        assert router.output_port(p).payload.shape() == flit_layout(ARCH)
    # The position ports are as wide as the flit's destination fields they are compared with.
    assert len(router.row) == ARCH.row_bits and len(router.col) == ARCH.col_bits
    assert router.signature.members["row"].flow is In and router.signature.members["col"].flow is In
