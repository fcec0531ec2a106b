"""The emulator on multi-chip programs (``Arch.chips`` chips in a line joined by links, fault free):

* outputs equal the same network on one chip (and the numpy golden): a link passes the flits' data unchanged
  (every flit lands on tile (0,0) of the next chip);
* every link's event times (accept, close, send, receive, deliver) equal a slow, cycle-stepped reference of the
  link written here from the timing contract of :mod:`flowtile.link_format` (a plain loop per cycle: the sender
  taking flits and closing frames, the serializer, the wire's latency stages, the receiver accepting frames and
  handing out flits, the return messages every ``ret_beats`` cycles and the sender's ack / freed registers), given
  the cycles in which chip ``k`` offers each flit and chip ``k + 1``'s input FIFO has room for it, both from the
  emulator's solution; and they satisfy the contract's recurrences with equality (the hardware fires in the first
  cycle its rules allow);
* large batches: the probe and its extrapolation equal plain sweeps of the whole batch;
* a slow link is the bottleneck: the interval is ``frames * frame_beats`` per inference;
* programs the emulator cannot run are refused naming the link or the chip.
"""
from __future__ import annotations

import copy
from collections import deque

import numpy as np
import pytest

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.emulator import DeadlockError, EmulatorError, WatchdogError, emulate
from flowtile.emulator.timing import next_message, solve_timing, timing_graph
from flowtile.host import HostPattern, pack_flits
from flowtile.link_format import LaneSegment, LinkGeometry, lane_segments_of_tensors
from flowtile.program import LinkProgram, Program, ProgramError, TileProgram
from flowtile.testing.program_builder import Conv, Dense, MaxPool, build_program, dense_golden, network_golden
from flowtile.tile_config import TileConfig


# --- programs: one network on a line of chips, and the same network on one chip --------------------------------

def on_chips(single: Program, chip_arch: Arch, segments=None) -> Program:
    """``single`` (a chain of ``chip_arch.system_tiles`` tiles on one chip) cut into ``chip_arch.chips`` chips: tile
    ``p`` of the chain goes to system position ``p``; within a chip each tile sends to the next chain tile, the exit
    tile of chip ``k`` sends to the host port (``dest_host = 1``) naming tile (0,0) of chip ``k + 1``, over link
    ``k``; the last chip's exit tile sends to the host. ``segments``: each link's lane table (default: none, every
    lane carried)."""
    n = chip_arch.n_tiles
    assert len(single.tiles) == chip_arch.system_tiles
    tiles = []
    for position, tile in enumerate(single.tiles):
        chip, row, col = chip_arch.system_position(position)
        config = tile.config
        if config.n_in_words or config.n_pass:
            if (position + 1) % n == 0:
                config = config.replace(dest_host=1, dest_row=0, dest_col=0)
            else:
                dest_row, dest_col = chip_arch.chain_position((position + 1) % n)
                config = config.replace(dest_host=0, dest_row=dest_row, dest_col=dest_col)
        tiles.append(TileProgram(row, col, config, tile.sram, tile.params, chip=chip))
    segments = segments or [()] * (chip_arch.chips - 1)
    links = [LinkProgram(tiles[(k + 1) * n - 1].config.output_flits(chip_arch.lanes), tuple(segments[k]))
             for k in range(chip_arch.chips - 1)]
    program = Program(chip_arch, single.input, single.output, single.layers, tiles, "multichip", links)
    program.validate()
    return program


def networks(layers, chips, rows=1, cols=2, *, lanes=4, depth=4, queue=None, input_shape=None, segments=None,
             **link):
    """(multi-chip program, one-chip program) of ``layers`` (program_builder layers; ``input_shape`` as for
    ``build_program``) on ``chips`` chips of ``rows x cols`` tiles (``link``: Arch link fields). ``queue``: the
    tiles' forward queues, ``build_program``'s ``queue_words`` (None: all the SRAM their weights and banks leave
    free; an int: that many words each; a sequence: per chain position); both programs have the same. Result rings
    of ceil(64 / lanes) words (the parameter table's depth, which was the ring's before it had its own field)."""
    common = dict(lanes=lanes, sram_bytes=lanes * 512, max_tile_outputs=64, result_ring_words=-(-64 // lanes),
                  router_fifo_depth=depth)
    line = lean_arch(rows=1, cols=chips * rows * cols, **common)
    single = build_program(line, layers, input_shape=input_shape, queue_words=queue)
    return on_chips(single, lean_arch(rows=rows, cols=cols, chips=chips, **common, **link), segments), single


def dense(rng, n_in, n_out, tiles=1, shift=None):
    weights = rng.integers(-128, 128, (n_out, n_in), dtype=np.int8)
    bias = rng.integers(-2000, 2000, n_out)
    multiplier = rng.integers(2**30, 2**31, n_out)
    shift = np.full(n_out, shift or 31 + max(0, int(np.log2(max(1, n_in)) + 4)))
    return Dense(weights, bias, multiplier, shift, int(rng.integers(-10, 11)), -128, 127, tiles)


def run(program, x, batch, **options):
    return emulate(program, pack_flits(x, program.arch.lanes, program.input), batch, **options)


# --- the link, one cycle at a time (the contract of flowtile.link_format) ---------------------------------------

def link_boundary(program, result, k):
    """From the emulator's solution, the cycles from which chip ``k`` offers each flit to link ``k`` (its exit
    FIFO's write + 1) and from which chip ``k + 1``'s tile (0,0) W FIFO has room for each flit (the read of the
    flit ``depth`` before it + 1; 0 for the first ``depth``)."""
    graph = timing_graph(program, result.path)
    link, times = graph.links[k], result.timing.stream_times
    into = next(f for f in graph.fifos if f.reader == link.sender)
    out = next(f for f in graph.fifos if f.writer == link.deliver)
    assert into.write_slots is None and out.read_slots is None
    offers = times[into.writer] + 1
    reads = times[out.reader]
    rooms = np.zeros_like(reads)
    rooms[out.depth:] = reads[:-out.depth] + 1
    return offers, rooms


def frame_bounds(geometry: LinkGeometry, n: int, batch: int, segments=()) -> list[tuple[int, int]]:
    """(first flit, end flit) of every frame over the batch: each inference's frames by the spec's greedy packing
    of its flits' carried lanes (:func:`flowtile.link_format.frame_sizes`)."""
    ends = np.cumsum(geometry.inference_frame_sizes(n, segments)).tolist()
    return [(s * n + lo, s * n + hi) for s in range(batch) for lo, hi in zip([0] + ends[:-1], ends)]


def link_reference(geometry: LinkGeometry, n: int, batch: int, offers, rooms, max_cycles=1_000_000, segments=()):
    """Step link ``geometry`` cycle by cycle, carrying ``batch`` inferences of ``n`` flits: chip ``k`` offers flit
    ``i`` from cycle ``offers[i]``, chip ``k + 1``'s input FIFO takes it from cycle ``rooms[i]``. Every decision of
    cycle ``t`` reads the state at the start of ``t``; counters and registers updated in ``t`` show from ``t + 1``.

    Sender: takes one flit a cycle into the frame it fills, the first flit of frame ``f`` only once frame ``f - 1``
    has closed (in an earlier cycle); closes frame ``f`` (flits by :func:`frame_bounds`) once all its flits are in
    (taken in earlier cycles), in an earlier cycle than nothing else, and while its ack register shows at most ``replay_frames - 1`` closed frames
    unacknowledged; frames never span inferences. Serializer: loads the next closed frame once the previous
    frame's beats are out (``frame_beats`` cycles after its load) and while the freed register leaves credit
    (``f - freed < credit_frames``); the frame's beat ``b`` is on the wire in load + 1 + ``b``; the wire has
    ``latency`` stages. Receiver: sees a frame's last beat, accepts the frame the cycle after (ack counter + 1);
    its flits are handed out in order, one a cycle, from the cycle after the accept, each when the next chip's
    FIFO has room; the frame is freed (freed counter + 1) when its last flit has left. Return messages: message
    ``m`` starts in cycle ``m * ret_beats`` with the counters as they stand in that cycle; its ``ret_beats``
    beats follow from the next cycle, cross the ``latency`` stages, are checked one cycle after the last, and the
    sender's registers hold its counters from the cycle after that.

    Returns dict of int64 arrays: accept, deliver (per flit), close, send, received (per frame)."""
    g = geometry
    beats, latency, period = g.frame_beats, g.latency, g.ret_beats
    total = n * batch
    frames = frame_bounds(g, n, batch, segments)   # (first flit, end flit) per frame, over the batch
    accept, deliver = [None] * total, [None] * total
    close, send, received = [None] * len(frames), [None] * len(frames), [None] * len(frames)
    frame_of = {flit: f for f, (lo, hi) in enumerate(frames) for flit in range(lo, hi)}
    taken = closed = loaded = 0                 # sender: flits taken, frames closed, frames loaded
    ack_register = freed_register = 0           # the sender's view of the receiver's counters
    acked = freed = 0                           # the receiver's counters
    messages = deque()                          # (holds from, ack, freed)
    wire = deque([None] * latency)              # the forward wire's stages: (frame, beat) or None
    seen_last = None                            # frame whose last beat the deserializer saw in the cycle before
    buffer = deque()                            # (flit, offered from)
    delivered = 0
    for t in range(max_cycles):
        if delivered == total:
            break
        while messages and messages[0][0] <= t:
            _, ack_register, freed_register = messages.popleft()
        if t % period == 0:                      # message m starts in cycle m * ret_beats
            messages.append((t + period + latency + 2, acked, freed))
        # the wire: the beat on the sender's side in t (from the frame loaded last), the receiver's side in t
        beat = None
        if loaded and send[loaded - 1] + 1 <= t <= send[loaded - 1] + beats:
            beat = (loaded - 1, t - send[loaded - 1] - 1)
        wire.append(beat)
        arriving = wire.popleft()
        # decisions from the state at the start of t
        accept_frame = seen_last
        deliver_flit = None
        if buffer and buffer[0][1] <= t and rooms[buffer[0][0]] <= t:
            deliver_flit = buffer[0][0]
        take = None
        if taken < total and offers[taken] <= t:
            f = frame_of[taken]
            if taken > frames[f][0] or closed == f:     # a frame's first flit: the frame before has closed
                take = taken
        close_frame = None
        if closed < len(frames) and taken >= frames[closed][1] and accept[frames[closed][1] - 1] < t \
                and ack_register >= closed - g.replay_frames + 1:
            close_frame = closed
        load = None
        if loaded < closed and (loaded == 0 or t >= send[loaded - 1] + beats) \
                and freed_register >= loaded - g.credit_frames + 1:
            load = loaded
        # apply
        seen_last = arriving[0] if arriving is not None and arriving[1] == beats - 1 else None
        if accept_frame is not None:
            assert accept_frame == acked, "frames arrive in order"
            assert acked - freed < g.credit_frames, f"frame {accept_frame} arrives without room (credit broken)"
            received[accept_frame] = t
            acked += 1
            lo, hi = frames[accept_frame]
            buffer.extend((flit, t + 1) for flit in range(lo, hi))
        if deliver_flit is not None:
            buffer.popleft()
            deliver[deliver_flit] = t
            delivered += 1
            if deliver_flit == frames[frame_of[deliver_flit]][1] - 1:
                freed += 1
        if take is not None:
            accept[take] = t
            taken += 1
        if close_frame is not None:
            close[close_frame] = t
            closed += 1
        if load is not None:
            send[load] = t
            loaded += 1
    else:
        raise AssertionError(f"the link reference did not finish in {max_cycles} cycles")
    return {name: np.array(values, dtype=np.int64) for name, values in
            (("accept", accept), ("close", close), ("send", send), ("received", received), ("deliver", deliver))}


def assert_contract(geometry: LinkGeometry, n: int, batch: int, offers, rooms, times, segments=()) -> set[str]:
    """The contract's recurrences, each event in the first cycle its bounds allow (equality with their max).
    Returns the names of the bounds that were alone the largest somewhere (the rules that held an event back)."""
    g = geometry
    frame_starts, frame_ends = map(list, zip(*frame_bounds(g, n, batch, segments)))
    starts = {lo: f for f, lo in enumerate(frame_starts)}
    accept, close, send = times.accept, times.close, times.send
    binding = set()

    def fired(event, value, bounds):
        values = list(bounds.values())
        assert value == max(values), f"{event}: cycle {value}, bounds {bounds}"
        top = [name for name, bound in bounds.items() if bound == value]
        if len(top) == 1:
            binding.add(top[0])
    received, deliver = times.received, times.deliver
    np.testing.assert_array_equal(received, send + g.accept_delay)
    for i in range(n * batch):
        bounds = {"offered": int(offers[i]), "run": 0}
        if i:
            bounds["accept one a cycle"] = int(accept[i - 1]) + 1
        if i in starts and starts[i]:
            bounds["accept after close"] = int(close[starts[i] - 1]) + 1
        fired(f"accept of flit {i}", accept[i], bounds)
    for f, (lo, hi) in enumerate(zip(frame_starts, frame_ends)):
        bounds = {"close after last flit": int(accept[hi - 1]) + 1}
        if f:
            bounds["close one a cycle"] = int(close[f - 1]) + 1
        if f >= g.replay_frames:
            bounds["ack_seen"] = int(next_message(received[f - g.replay_frames] + 1, g.message_period)) \
                + g.message_delay
        fired(f"close of frame {f}", close[f], bounds)
        bounds = {"send after close": int(close[f]) + 1}
        if f:
            bounds["send back to back"] = int(send[f - 1]) + g.frame_beats
        else:
            bounds["run"] = 0
        if f >= g.credit_frames:
            bounds["freed_seen"] = int(next_message(deliver[frame_ends[f - g.credit_frames] - 1] + 1,
                                                    g.message_period)) + g.message_delay
        fired(f"send of frame {f}", send[f], bounds)
    for i in range(n * batch):
        bounds = {"room": int(rooms[i]), "run": 0}
        if i:
            bounds["deliver one a cycle"] = int(deliver[i - 1]) + 1
        if i in starts:
            bounds["deliver after accept"] = int(received[starts[i]]) + 1
        fired(f"delivery of flit {i}", deliver[i], bounds)
    return binding


def assert_links_match_reference(program, result) -> set[str]:
    """Every link's times against :func:`assert_contract` and :func:`link_reference`; returns the rules that
    held events back."""
    binding = set()
    for k, times in enumerate(result.timing.link_times):
        geometry = LinkGeometry(program.arch)
        n = program.links[k].inference_flits
        offers, rooms = link_boundary(program, result, k)
        segments = program.links[k].segments
        binding |= assert_contract(geometry, n, result.batch, offers, rooms, times, segments)
        reference = link_reference(geometry, n, result.batch, offers, rooms, segments=segments)
        for name, expected in reference.items():
            actual = getattr(times, name)
            differing = np.flatnonzero(actual != expected)
            assert not differing.size, (f"link {k} {name}: {differing.size} times differ from the reference, first "
                                        f"at {differing[0]}: emulator {actual[differing[0]]}, reference "
                                        f"{expected[differing[0]]}")
    return binding


# --- tests ----------------------------------------------------------------------------------------------------

#: (chips, per layer (n_out, tiles), pass-through tiles follow the layers); each chip 1x2
LAYOUTS = {
    "2 chips, a MAC layer, pass-through": (2, [(6, 1)]),
    "2 chips, a layer across the link": (2, [(12, 1), (10, 2)]),
    "3 chips, two layers": (3, [(9, 2), (5, 1)]),
    "3 chips, pass-through only after one tile": (3, [(4, 1)]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_outputs_equal_one_chip_and_links_match_reference(layout):
    chips, shape = LAYOUTS[layout]
    rng = np.random.default_rng(sorted(LAYOUTS).index(layout))
    layers, width = [], 10
    for n_out, tiles in shape:
        layers.append(dense(rng, width, n_out, tiles))
        width = n_out
    program, single = networks(layers, chips)
    batch = 7
    x = rng.integers(-128, 128, (batch, 10), dtype=np.int8)
    result, one_chip = run(program, x, batch), run(single, x, batch)
    np.testing.assert_array_equal(result.out_flits, one_chip.out_flits)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :width], dense_golden(layers, x))
    assert len(result.links) == chips - 1 == len(result.timing.link_times)
    assert result.cycles > one_chip.cycles
    assert_links_match_reference(program, result)
    # chip k + 1's host input is the link's delivery, chip k's host output its sender's accepts
    for k, times in enumerate(result.timing.link_times):
        receiver = program.tiles[(k + 1) * program.arch.n_tiles]
        np.testing.assert_array_equal(result.timing.pe_times[(k + 1) * program.arch.n_tiles].input,
                                      times.deliver + 1, err_msg=f"{receiver.key} reads each flit the cycle after")


def test_windowed_network_on_chips_of_2x2():
    """A convolution (3 row bands), a max pool (2 bands) and a dense layer (2 tiles) over 3 chips of 2x2 (the
    exit port of a 2-row chip faces west); large enough a batch for the probe."""
    rng = np.random.default_rng(31)
    lanes = 4
    conv = Conv(rng.integers(-128, 128, (5, 3, 3, 3), dtype=np.int8), rng.integers(-500, 500, 5), 2**30, 40,
                zp_in=-3, zp_out=2, clamp_lo=2, pads=(1, 1, 1, 1), tiles=3)
    layers, shape = [conv, MaxPool(2, 2, stride=2, tiles=2), dense(rng, 3 * 3 * 2 * lanes, 7, 2)], (3, 6, 6)
    program, single = networks(layers, 3, 2, 2, lanes=lanes, input_shape=shape, link_credit_frames=2,
                               link_latency_cycles=9)
    assert program.arch.exit_direction == "W" and [link.inference_flits for link in program.links] == [84, 2]
    batch = 40
    x = rng.integers(-128, 128, (batch, 3 * 6 * 6), dtype=np.int8)
    result = run(program, x, batch)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, lanes))
    np.testing.assert_array_equal(result.out_flits, run(single, x, batch).out_flits)
    direct = solve_timing(program, batch, probe_batch=None)
    for probed, swept in zip(result.timing.stream_times, direct.stream_times):
        np.testing.assert_array_equal(probed, swept)
    assert_links_match_reference(program, result)


def test_flits_cross_as_data_and_land_on_tile_0_0_of_the_next_chip():
    """Only data crosses a link: every flit enters chip ``k + 1`` through its tile (0,0) W FIFO addressed to that
    tile, which reads it (no router hop on chip ``k + 1``); a program whose exit tile names another tile of the next
    chip is refused by the spec (Program.validate, so by the emulator too), in one line."""
    rng = np.random.default_rng(37)
    layers = [dense(rng, 6, 7), dense(rng, 7, 9)]
    program, single = networks(layers, 2)
    batch = 6
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    result = run(program, x, batch)
    np.testing.assert_array_equal(result.out_flits, run(single, x, batch).out_flits)
    crossing = next(hop for hop in result.path.hops if hop.link is not None)
    assert (crossing.producer, crossing.consumer, crossing.link, crossing.link_fifos) == (1, 2, 0, ((0, 0, "W"),))
    # chip 1's tile (0,0) reads each flit the cycle after the link delivers it
    np.testing.assert_array_equal(result.timing.pe_times[2].input, result.timing.link_times[0].deliver + 1)
    assert_links_match_reference(program, result)

    for dest in (dict(dest_row=0, dest_col=1), dict(dest_row=1, dest_col=0)):
        wrong = copy.deepcopy(program)
        wrong.tiles[1].config = wrong.tiles[1].config.replace(**dest)
        expected = (rf"link 0: exit tile r0c1 of chip 0 sends to tile \({dest['dest_row']},{dest['dest_col']}\) of "
                    rf"chip 1, .* exit tile of chip 0 must send to \(0,0\) with dest_host = 1")
        with pytest.raises(ProgramError, match=expected) as refused:
            wrong.validate()
        assert "\n" not in str(refused.value)
        with pytest.raises(ProgramError, match=expected):
            run(wrong, x, batch)
    # the last chip's exit tile sends to the host: its dest_row / dest_col are not a link's concern
    last = copy.deepcopy(program)
    last.tiles[3].config = last.tiles[3].config.replace(dest_row=0, dest_col=1)
    last.validate()


#: link and chip settings (Arch fields) whose rules bind in turn: tiny credit / replay windows, one-flit frames,
#: partial frames, a short and a long wire, the fastest link, depth-1 FIFOs, a slow receiving chip
LINKS = {
    "defaults": {},
    "credit 1, replay 1": {"link_credit_frames": 1, "link_replay_frames": 1},
    "credit 1, replay 3, latency 5": {"link_credit_frames": 1, "link_replay_frames": 3, "link_latency_cycles": 5},
    "credit 2, replay 1, latency 1": {"link_credit_frames": 2, "link_replay_frames": 1, "link_latency_cycles": 1},
    "one-flit frames": {"link_frame_flits": 1, "link_credit_frames": 2, "link_replay_frames": 2},
    "partial frames": {"link_frame_flits": 3},
    "fastest link, latency 1": {"link_bits_per_cycle": 35, "link_latency_cycles": 1, "link_credit_frames": 1},
    "depth-1 FIFOs": {"depth": 1, "link_credit_frames": 2, "link_latency_cycles": 3},
    "long wire": {"link_latency_cycles": 300, "link_credit_frames": 2, "link_replay_frames": 4},
}


def link_case(name, slow_receiver, batch, seed):
    """(program, one-chip program, x) of LINKS[name] on 2 chips of 1x2; ``slow_receiver``: a wide MAC layer on
    chip 1's first tile, slower per inference than the link, so that credit holds the link back."""
    rng = np.random.default_rng(seed)
    settings = dict(LINKS[name])
    depth = settings.pop("depth", 4)
    layers = [dense(rng, 6, 7)] + ([dense(rng, 7, 7), dense(rng, 7, 64)] if slow_receiver else [])
    program, single = networks(layers, 2, depth=depth, **settings)
    assert not slow_receiver or program.tiles[2].config.n_out == 64
    return program, single, rng.integers(-128, 128, (batch, 6), dtype=np.int8)


@pytest.mark.parametrize("name", sorted(LINKS))
@pytest.mark.parametrize("slow_receiver", [False, True])
def test_link_times_match_cycle_reference(name, slow_receiver):
    program, single, x = link_case(name, slow_receiver, 12, sorted(LINKS).index(name) + 100 * slow_receiver)
    result = run(program, x, len(x))
    np.testing.assert_array_equal(result.out_flits, run(single, x, len(x)).out_flits)
    assert_links_match_reference(program, result)


def test_every_contract_rule_holds_events_back():
    """Over the LINKS cases each rule of the contract is alone the one that sets some event's cycle (so the
    reference comparisons above exercise them all)."""
    binding = set()
    for name in sorted(LINKS):
        for slow_receiver in (False, True):
            program, _, x = link_case(name, slow_receiver, 12, 1)
            binding |= assert_links_match_reference(program, run(program, x, len(x)))
    assert binding >= {"offered", "accept one a cycle", "accept after close", "close after last flit", "ack_seen",
                       "send after close", "send back to back", "freed_seen", "room", "deliver one a cycle",
                       "deliver after accept"}, binding


def test_frames_never_span_inferences():
    """5 flits per inference in frames of 4: frames of 4 and 1 flits, each inference's last frame partial."""
    rng = np.random.default_rng(5)
    program, _ = networks([dense(rng, 8, 20)], 2, lanes=4, link_frame_flits=4)
    assert program.links[0].inference_flits == 5
    result = run(program, rng.integers(-128, 128, (3, 8), dtype=np.int8), 3)
    times = result.timing.link_times[0]
    assert len(times.close) == len(times.send) == 6 and result.links[0].frames_per_inference == 2
    accept = times.accept.reshape(3, 5)
    close = times.close.reshape(3, 2)
    assert (close[:, 0] > accept[:, 3]).all()
    assert (accept[:, 4] > close[:, 0]).all() and (close[:, 1] > accept[:, 4]).all()
    assert (accept[1:, 0] > close[:-1, 1]).all()
    assert_links_match_reference(program, result)


@pytest.mark.parametrize("name", ["defaults", "credit 1, replay 1", "one-flit frames", "depth-1 FIFOs",
                                  "long wire"])
def test_large_batch_probe_equals_direct_sweep(name):
    rng = np.random.default_rng(7 + sorted(LINKS).index(name))
    settings = dict(LINKS[name])
    depth = settings.pop("depth", 4)
    layers = [dense(rng, 6, 7), dense(rng, 7, 9), dense(rng, 9, 5)]
    program, single = networks(layers, 3, depth=depth, **settings)
    batch = 120
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    result = run(program, x, batch)
    direct = solve_timing(program, batch, probe_batch=None)
    for name_, probed, swept in zip(result.timing.stream_names, result.timing.stream_times, direct.stream_times):
        np.testing.assert_array_equal(probed, swept, err_msg=f"chain {name_}: probe + extrapolation vs sweeps")
    np.testing.assert_array_equal(result.out_flits, run(single, x, batch).out_flits)
    assert_links_match_reference(program, result)


def dense_frames_case(segments, batch=30, seed=41, **link):
    """A 3x3 convolution of a 1 x 6 x 6 map to 5 channels on chip 0 (36 pixels of 2 words: 4 + 1 channels), then
    a 2x2 max pool on chip 1 and a dense layer on chip 2 (chips of one tile, lanes 4, frames of 4 flits = 16
    bytes): link 0 carries the convolution's output with lane table ``segments``, link 1 the pool's (9 pixels of 5
    channels) with the table that describes it."""
    rng = np.random.default_rng(seed)
    lanes, shape = 4, (1, 6, 6)
    conv = Conv(rng.integers(-128, 128, (5, 1, 3, 3), dtype=np.int8), rng.integers(-500, 500, 5), 2**30, 38,
                zp_in=-3, zp_out=2, clamp_lo=-128, pads=(1, 1, 1, 1), tiles=1)
    layers = [conv, MaxPool(2, 2, stride=2, tiles=1), dense(rng, 3 * 3 * 2 * lanes, 7, 1)]
    program, single = networks(layers, 3, 1, 1, lanes=lanes, input_shape=shape,
                               segments=[segments, lane_segments_of_tensors([(9, 5)], lanes)[0]],
                               link_frame_flits=4, link_bits_per_cycle=1, **link)
    x = rng.integers(-128, 128, (batch, 36), dtype=np.int8)
    return program, single, layers, shape, x


def test_dense_frames_carry_only_the_channels():
    """The convolution's 5 channels cross as 5 bytes a pixel, not 8: frames of 16 bytes hold 3 pixels (6 flits),
    so an inference takes 12 frames instead of 18, and the link (the bottleneck at 1 wire bit a cycle) takes 2/3
    of the cycles; outputs as on one chip, every link event as the cycle reference says."""
    segments, flits = lane_segments_of_tensors([(36, 5)], 4)
    assert segments == (LaneSegment(72, 2, 1),) and flits == 72
    dense_program, single, layers, shape, x = dense_frames_case(segments)
    padded_program, *_ = dense_frames_case(())
    geometry = LinkGeometry(dense_program.arch)
    assert geometry.frames(72, segments) == 12 and geometry.frames(72) == 18
    batch = len(x)
    dense_run, padded_run = run(dense_program, x, batch), run(padded_program, x, batch)
    golden = network_golden(layers, x, shape, 4)
    for result in (dense_run, padded_run):
        np.testing.assert_array_equal(result.out_flits, golden)
    np.testing.assert_array_equal(dense_run.out_flits, run(single, x, batch).out_flits)
    assert dense_run.links[0].frames_per_inference == 12 and padded_run.links[0].frames_per_inference == 18
    assert dense_run.links[0].carried_bytes_per_inference == 36 * 5
    steady = [np.diff(r.out_times[r.out_times.size // 2:][::dense_program.output_words]).max()
              for r in (dense_run, padded_run)]
    assert steady[0] * 3 <= steady[1] * 2 + 3, steady
    assert_links_match_reference(dense_program, dense_run)
    assert_links_match_reference(padded_program, padded_run)


def test_lane_table_decides_what_crosses():
    """A lane table that carries only lane 0 of every flit loses channels 1..3 (the emulator zeroes what the
    table does not carry, as the receiver does), so the outputs change: the table is part of the data path."""
    program, _, layers, shape, x = dense_frames_case((LaneSegment(72, 1, 1),))
    result = run(program, x, len(x))
    assert (result.out_flits != network_golden(layers, x, shape, 4)).any()
    assert result.links[0].frames_per_inference == 72 // 16 + (72 % 16 > 0)
    assert_links_match_reference(program, result)


def test_lane_table_is_validated():
    program, *_ = dense_frames_case(())
    for segments, message in (((LaneSegment(73, 2, 1),), r"the segments cover 73 flits, more than the 72"),
                              ((LaneSegment(8, 2, 5),), r"segment 0 field 'last_lanes' = 5 is outside 1..4"),
                              ((LaneSegment(8, 0, 1),), r"segment 0 field 'period' = 0 is outside"),
                              ((LaneSegment(1, 1, 1),) * 5, r"5 lane segments, a link holds at most 4")):
        wrong = copy.deepcopy(program)
        wrong.links[0] = LinkProgram(72, segments)
        with pytest.raises(ProgramError, match=r"link 0 lane table: " + message):
            wrong.validate()


def test_slow_link_is_the_bottleneck():
    """One wire bit a cycle, 64 latency stages: the link carries a frame every frame_beats cycles, so in steady
    state an inference takes frames * frame_beats cycles."""
    rng = np.random.default_rng(11)
    program, single = networks([dense(rng, 8, 12), dense(rng, 12, 8)], 2, link_bits_per_cycle=1,
                               link_latency_cycles=64)
    geometry = LinkGeometry(program.arch)
    frames = geometry.frames(program.links[0].inference_flits)
    batch = 40
    x = rng.integers(-128, 128, (batch, 8), dtype=np.int8)
    result = run(program, x, batch)
    words = program.output_words
    last = result.out_times[words - 1::words]
    steady = np.diff(last[batch // 2:])
    assert (steady == frames * geometry.frame_beats).all(), steady
    send = result.timing.link_times[0].send
    np.testing.assert_array_equal(np.diff(send), geometry.frame_beats)       # frames back to back
    stats = result.links[0]
    assert stats.busy_cycles == batch * frames * geometry.frame_beats and stats.frames == batch * frames
    assert stats.first_send == send[0] and stats.last_send == send[-1]
    assert stats.utilization > 0.9
    assert result.interval_cycles > 0.9 * frames * geometry.frame_beats
    assert run(single, x, batch).interval_cycles < result.interval_cycles / 4
    assert_links_match_reference(program, result)


def test_host_stalls_on_a_multichip_run():
    """A host pattern gates chip 0's host input and the last chip's host output only."""
    rng = np.random.default_rng(13)
    program, single = networks([dense(rng, 6, 7), dense(rng, 7, 5)], 3, queue=1, link_latency_cycles=7,
                               link_credit_frames=2, link_frame_flits=4)
    batch = 40
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    # an output ready about 1 cycle in 200 is slower than the links: its stalls hold the last chip and, by credit, the
    # links back
    pattern = HostPattern(seed=3, out_duty=0.005, out_burst=200, in_duty=0.6)
    free, stalled = run(program, x, batch), run(program, x, batch, host_pattern=pattern)
    np.testing.assert_array_equal(free.out_flits, stalled.out_flits)
    assert stalled.cycles > 2 * free.cycles
    assert (stalled.in_times >= free.in_times).all() and (stalled.in_times > free.in_times).any()
    assert pattern.out_ready()[stalled.out_times % len(pattern.out_ready())].all()
    direct = solve_timing(program, batch, probe_batch=None, host_pattern=pattern)
    for probed, swept in zip(stalled.timing.stream_times, direct.stream_times):
        np.testing.assert_array_equal(probed, swept)
    assert "freed_seen" in assert_links_match_reference(program, stalled)


def test_report_and_statistics():
    rng = np.random.default_rng(17)
    program, single = networks([dense(rng, 6, 7), dense(rng, 7, 5)], 3)
    batch = 4
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    result, one_chip = run(program, x, batch), run(single, x, batch)
    report = result.report()
    assert report["chips"] == 3 and [link["link"] for link in report["links"]] == [0, 1]
    geometry = LinkGeometry(program.arch)
    for k, link in enumerate(report["links"]):
        n = program.links[k].inference_flits
        times = result.timing.link_times[k]
        assert link["flits"] == batch * n and link["frames"] == batch * geometry.frames(n)
        assert link["busy_cycles"] == link["frames"] * geometry.frame_beats
        assert (link["first_send"], link["last_send"]) == (times.send[0], times.send[-1])
        assert link["last_delivery"] == times.deliver[-1]
    assert result.tile_busy_cycles.shape == result.tile_macs.shape == (3, 1, 2)
    assert result.tile_macs.sum() == one_chip.tile_macs.sum()
    assert result.tile_busy_cycles.sum() == one_chip.tile_busy_cycles.sum()
    assert len(result.tile_timelines) == 6 and all(len(t) for t in result.tile_timelines)
    # one chip: no link figures, [rows, cols] arrays
    assert "links" not in one_chip.report() and one_chip.links == [] and one_chip.timing.link_times == []
    assert one_chip.tile_macs.shape == (1, 6)


def test_link_register_must_match_what_crosses():
    """A tile of chip 0 other than the exit tile sends to the host port: its flits cross link 0, whose register
    (the exit tile's count, 0) does not match."""
    rng = np.random.default_rng(19)
    program, _ = networks([dense(rng, 6, 7)], 2)
    first, exit_tile = program.tiles[0], program.tiles[1]
    first.config = first.config.replace(dest_host=1, dest_row=0, dest_col=0)
    exit_tile.config = exit_tile.config.replace(n_in_words=0, n_pass=0, store_end=0, forward_end=0)
    program.links[0] = LinkProgram(0)
    with pytest.raises(EmulatorError, match=r"link 0 \(chip 0 -> chip 1\): register inference_flits = 0, but tile "
                                            r"r0c0 .* sends 2 flits per inference over it"):
        run(program, np.zeros((1, 6), np.int8), 1)


def test_count_mismatch_across_a_link_names_the_chip():
    rng = np.random.default_rng(23)
    program, _ = networks([dense(rng, 6, 7)], 2)
    receiver = program.tiles[2]       # chip 1's (0,0): reads one flit more than link 0 brings
    receiver.config = receiver.config.replace(n_pass=receiver.config.n_pass + 1)
    with pytest.raises(DeadlockError, match=r"tile chip1.r0c0 .* reads .* but tile r0c1 over link 0 sends it 2"
                                            r".*tile chip 1 \(0,0\) input side waits on port W \(from tile r0c1 "
                                            r"over link 0\)"):
        run(program, np.zeros((2, 6), np.int8), 2)


def test_watchdog_names_the_links():
    rng = np.random.default_rng(29)
    program, _ = networks([dense(rng, 6, 7)], 2, link_bits_per_cycle=1)
    result = run(program, np.zeros((3, 6), np.int8), 3)
    limit = int(result.timing.link_times[0].deliver[2])
    with pytest.raises(WatchdogError, match=r"link 0 took \d+, delivered 3 of 6 flits"):
        run(program, np.zeros((3, 6), np.int8), 3, max_cycles=limit + 1)


def random_case(seed):
    """A seeded random multi-chip dense chain: lanes 1..8, 2 or 3 chips of 1x2, 2x1, 2x2 or 1x3 tiles, FIFO depths
    1..4, forward queues of 1, 2 or 5 words or large (all the free SRAM) drawn per tile (or large on every tile),
    random link geometry (wire width, latency, frame size, credit and replay windows), batches up to 70, sometimes a
    host pattern."""
    rng = np.random.default_rng(seed)
    lanes = int(rng.choice([1, 2, 4, 8]))
    chips = int(rng.integers(2, 4))
    rows, cols = [(1, 2), (2, 1), (2, 2), (1, 3)][int(rng.integers(0, 4))]
    n_layers = int(rng.integers(1, min(4, chips * rows * cols) + 1))
    n_in = width = int(rng.integers(1, 4 * lanes + 1))
    layers = []
    for _ in range(n_layers):
        n_out = int(rng.integers(1, min(64, 6 * lanes) + 1))
        layers.append(dense(rng, width, n_out))
        width = n_out
    link = {"link_latency_cycles": int(rng.choice([1, 2, 5, 20, 64, 200])),
            "link_frame_flits": int(rng.choice([1, 2, 3, 4, 8])),
            "link_credit_frames": int(rng.choice([1, 2, 3, 8])),
            "link_replay_frames": int(rng.choice([1, 2, 3, 8]))}
    if rng.random() < 0.5:
        link["link_bits_per_cycle"] = int(rng.integers(1, 8 * lanes + 3 + 1))
    depths = [1, 2, 5, None]     # None: all the tile's free SRAM (hundreds of words)
    queue = None if rng.random() < 0.25 else [depths[int(rng.integers(0, 4))] for _ in range(chips * rows * cols)]
    program, single = networks(layers, chips, rows, cols, lanes=lanes, depth=int(rng.integers(1, 5)), queue=queue,
                               **link)
    batch = int(rng.integers(1, 71))
    pattern = None
    if rng.random() < 0.4:
        pattern = HostPattern(seed=seed, out_duty=float(rng.choice([1.0, 0.5, 0.05, 0.01])),
                              out_burst=float(rng.choice([1, 4, 50])), in_duty=float(rng.choice([1.0, 0.5, 0.1])))
    return program, single, rng.integers(-128, 128, (batch, n_in), dtype=np.int8), layers, pattern


@pytest.mark.parametrize("seed", range(40))
def test_random_multichip_programs(seed):
    program, single, x, layers, pattern = random_case(seed)
    batch = len(x)
    result = run(program, x, batch, **({} if pattern is None else {"host_pattern": pattern}))
    np.testing.assert_array_equal(result.out_flits, run(single, x, batch).out_flits)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], dense_golden(layers, x))
    direct = solve_timing(program, batch, probe_batch=None, host_pattern=pattern)
    for name, probed, swept in zip(result.timing.stream_names, result.timing.stream_times, direct.stream_times):
        np.testing.assert_array_equal(probed, swept, err_msg=f"chain {name}: probe + extrapolation vs sweeps")
    assert_links_match_reference(program, result)
