"""Drives one harness job; the cocotb test module of :func:`flowtile.rtl.simulate.simulate` (Verilator flow).

A *job* (JSON, written by :mod:`flowtile.rtl.simulate`) holds everything the run needs as plain integers:
the load-bus payloads (already packed), the input flits' data words, the flit counts, the cycle
budget and where to write the result. :func:`run_job` is the one sequence both simulators follow,
written against a tiny :class:`HarnessBus` interface: the cocotb bus here, an Amaranth bus in
:mod:`flowtile.rtl.simulate`. That keeps the two flows step-for-step identical.

The cocotb test reads the job path from the environment variable :data:`JOB_ENV`. It always writes a
result file when the run itself finished (also on timeout, with ``status`` saying so) so that
:mod:`flowtile.rtl.simulate` can raise a precise error; a missing result file means the testbench crashed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import First, RisingEdge, Timer

__all__ = ["JOB_ENV", "CLOCK_PERIOD_NS", "RESET_CYCLES", "HarnessBus", "run_job", "flowtile_job"]

#: Environment variable holding the path of the job file.
JOB_ENV = "FLOWTILE_RTL_JOB"
#: Clock period of the simulation (only the cycle count matters; any period works).
CLOCK_PERIOD_NS = 10
#: Cycles the synchronous reset is held before loading.
RESET_CYCLES = 2

# Harness ports (see flowtile.rtl.harness.Harness); the load bus names come from the job because they are
# the chip's own port names.
_START, _IN_COUNT, _OUT_COUNT, _CYCLE_LIMIT = "start", "in_count", "out_count", "cycle_limit"
_IN_WRITE_EN, _IN_WRITE_ADDR, _IN_WRITE_DATA = "in_write_en", "in_write_addr", "in_write_data"
_OUT_READ_ADDR, _OUT_READ_DATA, _OUT_READ_STAMP = "out_read_addr", "out_read_data", "out_read_stamp"
_DONE, _TIMED_OUT, _UNEXPECTED = "done", "timed_out", "unexpected_output"
_SENT, _RECEIVED, _CYCLE = "in_sent", "out_received", "cycle"
_IN_AVAILABLE, _OUT_CONSUMED, _IN_LOW, _OUT_HIGH = "in_available", "out_consumed", "in_low", "out_high"
_UNDERRUN = "underrun"
_PATTERN_WRITE_EN, _PATTERN_WRITE_ADDR, _PATTERN_WRITE_DATA = "pattern_write_en", "pattern_write_addr", "pattern_write_data"
_OUT_GATE, _IN_GATE = "out_gate", "in_gate"


class HarnessBus:
    """What :func:`run_job` needs from a simulator.

    ``set`` takes effect for the next clock edge; ``tick`` waits for one clock edge; ``get`` right
    after ``tick`` returns a combinational output as it was just before that edge (cocotb's rule),
    which equals its settled value whenever the inputs it depends on did not change at that edge.
    ``wait_for_harness`` returns after the harness's ``stopped``, ``in_low`` or ``out_high`` rose (or after
    ``limit_cycles`` more cycles as a safety net), without waking Python on every cycle.
    """

    async def reset(self) -> None: ...

    def set(self, port: str, value: int) -> None: ...

    def get(self, port: str) -> int: ...

    async def tick(self) -> None: ...

    async def wait_for_harness(self, limit_cycles: int) -> None: ...


#: The watchdog looks at the host transfer counts this many times per stall window: a transfer is seen at most
#: one look (1/8 window) after it happened, and the run is stopped at the first look a whole window after that,
#: so between 1 and 1.25 windows after the last transfer.
STALL_POLLS_PER_WINDOW = 8


class _Rings:
    """The testbench's side of the harness's input and output rings (see flowtile.rtl.harness: streaming)."""

    def __init__(self, job: dict):
        self.depth = job["buffer_depth"]
        self.in_words = job["in_words"]
        self.out_count = job["out_count"]
        self.written = 0
        self.out_data: list[int] = []
        self.out_stamps: list[int] = []

    async def fill(self, bus: HarnessBus) -> None:
        """Before start: the first ``depth`` input flits."""
        bus.set(_IN_WRITE_EN, 1)
        for index in range(min(self.depth, len(self.in_words))):
            bus.set(_IN_WRITE_ADDR, index)
            bus.set(_IN_WRITE_DATA, self.in_words[index])
            await bus.tick()
        bus.set(_IN_WRITE_EN, 0)
        self.written = min(self.depth, len(self.in_words))
        bus.set(_IN_AVAILABLE, self.written)

    async def service(self, bus: HarnessBus, *, drain: bool = False) -> None:
        """Move one entry each way per cycle: write input flits while the input ring has room and read output
        entries while any are unread, until the input ring is full (or every flit written) and at most a
        quarter of the output ring is unread (``drain``: none), or the run stopped. The counts read after a
        tick are those from before its edge, i.e. lower bounds: never an overwrite of an unsent or unread entry."""
        while True:
            sent, received = bus.get(_SENT), bus.get(_RECEIVED)
            received = min(received, self.out_count)
            unread = received - len(self.out_data)
            write = self.written < len(self.in_words) and self.written - sent < self.depth
            read = unread > 0
            if not write and unread <= (0 if drain else self.depth // 4):
                break
            if not drain and (bus.get(_DONE) or bus.get(_TIMED_OUT)):
                break
            bus.set(_IN_WRITE_EN, int(write))
            if write:
                bus.set(_IN_WRITE_ADDR, self.written % self.depth)
                bus.set(_IN_WRITE_DATA, self.in_words[self.written])
            if read:
                bus.set(_OUT_READ_ADDR, len(self.out_data) % self.depth)
            await bus.tick()
            if write:
                self.written += 1
                bus.set(_IN_AVAILABLE, self.written)
            if read:
                self.out_data.append(bus.get(_OUT_READ_DATA))
                self.out_stamps.append(bus.get(_OUT_READ_STAMP))
                bus.set(_OUT_CONSUMED, len(self.out_data))
        bus.set(_IN_WRITE_EN, 0)


async def _run_until_stop(bus: HarnessBus, job: dict, rings: _Rings) -> bool:
    """Stream the rings until the harness stopped (done or timed out); with a ``stall_window`` in the job, look
    :data:`STALL_POLLS_PER_WINDOW` times per window at the host transfer counts (input flits accepted, output flits
    received) and give up (return True) once they stayed the same for a whole window since the look that saw
    them change, i.e. between 1 and 1.25 windows after the last transfer. Returns right after a clock edge."""
    limit = job["cycle_limit"] + job["stop_slack_cycles"]
    window = int(job.get("stall_window") or 0)
    poll = max(1, window // STALL_POLLS_PER_WINDOW) if window else limit
    seen, changed_at = None, 0
    while True:
        await bus.wait_for_harness(poll)
        await bus.tick()
        if bus.get(_DONE) or bus.get(_TIMED_OUT):
            return False
        if bus.get(_IN_LOW) or bus.get(_OUT_HIGH):
            await rings.service(bus)
            if bus.get(_DONE) or bus.get(_TIMED_OUT):
                return False
        cycle = bus.get(_CYCLE)
        now = (bus.get(_SENT), bus.get(_RECEIVED))
        if now != seen:
            seen, changed_at = now, cycle
        elif window and cycle - changed_at >= window:
            return True
        if cycle > limit:
            return False


async def run_job(bus: HarnessBus, job: dict) -> dict:
    """Load the chip, fill the input ring, run (streaming the rings), read back. Returns the result dictionary.

    Result keys: ``status`` ("ok", "timeout", "stalled": no host transfer for a whole ``stall_window``,
    "unexpected_output" or "underrun"), ``out_data`` and ``out_stamps`` (lists of ints, one per stored output entry
    up to ``out_count``), ``in_sent`` and ``out_received`` (flit counts), ``cycle`` (counter one cycle after the
    stop), ``chip_status`` (the job's ``status_ports`` read in that same cycle).
    """
    await bus.reset()

    # Load phase: one load per cycle, run = 0 (the harness holds run low until start).
    valid_port, payload_port = job["load_valid_port"], job["load_payload_port"]
    bus.set(valid_port, 1)
    for payload in job["load_payloads"]:
        bus.set(payload_port, payload)
        await bus.tick()
    bus.set(valid_port, 0)

    rings = _Rings(job)
    await rings.fill(bus)

    # Host stalls (optional job keys): the pattern entries (bit 0 output ready, bit 1 input valid) and the gates.
    pattern = job.get("pattern") or []
    if pattern:
        bus.set(_PATTERN_WRITE_EN, 1)
        for index, entry in enumerate(pattern):
            bus.set(_PATTERN_WRITE_ADDR, index)
            bus.set(_PATTERN_WRITE_DATA, entry)
            await bus.tick()
        bus.set(_PATTERN_WRITE_EN, 0)
    bus.set(_OUT_GATE, int(job.get("out_gate", 0)))
    bus.set(_IN_GATE, int(job.get("in_gate", 0)))

    bus.set(_IN_COUNT, job["in_count"])
    bus.set(_OUT_COUNT, job["out_count"])
    bus.set(_CYCLE_LIMIT, job["cycle_limit"])
    bus.set(_START, 1)
    await bus.tick()
    bus.set(_START, 0)

    # The run itself: no Python until the harness says it stopped or needs its rings served, or (watchdog) once
    # per stall window to see whether any host transfer happened since the last look.
    stalled = await _run_until_stop(bus, job, rings)
    done, timed_out = bus.get(_DONE), bus.get(_TIMED_OUT)
    unexpected, underrun = bus.get(_UNEXPECTED), bus.get(_UNDERRUN)
    sent, received, cycle = bus.get(_SENT), bus.get(_RECEIVED), bus.get(_CYCLE)
    # the chip's status counters (a System's links) as they stood in that same cycle
    chip_status = {port: bus.get(port) for port in job.get("status_ports", [])}
    await rings.service(bus, drain=True)

    if not done:
        status = "timeout" if timed_out else "stalled" if stalled else "not_stopped"
    elif unexpected:
        status = "unexpected_output"
    elif underrun:
        status = "underrun"
    else:
        status = "ok"
    return {"status": status, "out_data": rings.out_data, "out_stamps": rings.out_stamps,
            "in_sent": sent, "out_received": received, "cycle": cycle, "chip_status": chip_status}


class _CocotbBus(HarnessBus):
    def __init__(self, dut):
        self.dut = dut
        self._handles = {}

    def _handle(self, port):
        handle = self._handles.get(port)
        if handle is None:
            handle = self._handles[port] = getattr(self.dut, port)
        return handle

    async def reset(self):
        self.dut.rst.value = 1
        for _ in range(RESET_CYCLES):
            await RisingEdge(self.dut.clk)
        self.dut.rst.value = 0

    def set(self, port, value):
        self._handle(port).value = value

    def get(self, port):
        return int(self._handle(port).value)

    async def tick(self):
        await RisingEdge(self.dut.clk)

    async def wait_for_harness(self, limit_cycles):
        await First(RisingEdge(self.dut.stopped), RisingEdge(self.dut.in_low), RisingEdge(self.dut.out_high),
                    Timer(limit_cycles * CLOCK_PERIOD_NS, unit="ns"))


@cocotb.test()
async def flowtile_job(dut):
    """Run the job named by ``$FLOWTILE_RTL_JOB`` and write its result file."""
    job = json.loads(Path(os.environ[JOB_ENV]).read_text())
    cocotb.start_soon(Clock(dut.clk, CLOCK_PERIOD_NS, unit="ns").start())
    result = await run_job(_CocotbBus(dut), job)
    Path(job["result_path"]).write_text(json.dumps(result))
