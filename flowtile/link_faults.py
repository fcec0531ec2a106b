"""The inter-chip link's fault model (docs/architecture.md section 12): which wire lines of a link channel flip in
which cycle, for a seed, a bit-error rate and a burst length. The hardware (:class:`flowtile.hdl.link.LinkChannel`)
implements it and the emulator (:mod:`flowtile.emulator.link_faults`) predicts it, both from the definitions here;
neither imports the other. Also the two CRCs of the link in plain Python (the emulator checks words with them).

Lines. A channel of ``bits`` data bits has ``width = bits + 2`` lines: ``data[0..bits-1]`` are lines ``0..bits-1``,
``valid`` is line ``bits``, ``first`` line ``bits + 1``. Flips act on the channel's output (after the ``latency``
stages): the receiver sees the sender's wire of cycle ``t - latency`` XOR the flip mask of cycle ``t``.

Cycles. The injector counts the cycles of the run: cycle ``r`` is the ``r``-th cycle with ``run = 1`` (0 the
first; ``run`` held high for the whole run, as in :class:`flowtile.hdl.system.System`). Nothing flips and no
generator steps while ``run = 0`` (a standalone :class:`LinkChannel` has ``run = 1`` from reset).

Generators. Every line ``b`` has a 32-bit Galois LFSR (:func:`lfsr_step`, taps :data:`LFSR_TAPS`, maximal length),
seeded ``lfsr_seed(seed, b)``; with bursts (``burst_cycles > 1``) the channel has one more, the burst LFSR, seeded
``lfsr_seed(seed, width)``. In run cycle ``r`` every LFSR holds ``M^r`` of its seed, ``M`` being 16 steps
(:func:`lfsr_step_matrix` of :data:`STEPS_PER_CYCLE`): ``current``.

Rule, per run cycle (``p = error_rate``, ``B = burst_cycles``):

* ``B = 1`` (no bursts): line ``b`` flips iff ``current_b & 0xFFFF < line_threshold``, ``line_threshold =
  round(p * 2**16)`` (:func:`line_threshold`): each line flips independently with probability
  ``line_threshold / 2**16`` (``p`` rounded to a multiple of 2**-16: 1e-5 gives 1.53e-5);
* ``B > 1`` (bursts only): a burst starts in cycle ``r`` iff no burst is under way (``left = 0``) and the burst
  LFSR's whole state ``< burst_threshold = round(2 * p / B * 2**32)`` (:func:`burst_threshold`); it covers cycles
  ``r .. r + B - 1`` (``left`` counts the cycles after this one: ``B - 1`` after a start, then down to 0). In a
  cycle of a burst line ``b`` flips iff bit :data:`BURST_FLIP_BIT` of ``current_b`` is 1 (probability 1/2); outside
  bursts nothing flips. A burst flips about ``B * width / 2`` bits over ``B`` consecutive beats, and the long-run
  rate per line and cycle is ``q * B / 2 / (1 + q * (B - 1)) ~= p`` with ``q = 2p / B`` the start probability.

Seeds of a system (:func:`link_seed`, :func:`ret_seed`): link ``k``'s forward channel is seeded
``link_seed(arch.link_error_seed, k)``, its return channel ``ret_seed`` of that, so every channel has its own.
"""
from __future__ import annotations

__all__ = ["LFSR_TAPS", "STEPS_PER_CYCLE", "THRESHOLD_BITS", "BURST_FLIP_BIT", "lfsr_step", "lfsr_step_matrix",
           "lfsr_seed", "ret_seed", "link_seed", "line_threshold", "burst_threshold", "channel_lines",
           "channel_seeds", "reference_flips", "crc_compute", "CRC32_ISO_HDLC", "CRC16_IBM_3740", "CrcParams"]

#: 32-bit Galois LFSR taps (x^32 + x^22 + x^2 + x + 1, maximal length), right-shifting.
LFSR_TAPS = 0x80200003
#: LFSR steps per cycle.
STEPS_PER_CYCLE = 16
#: Bits of a line LFSR compared with the line threshold.
THRESHOLD_BITS = 16
#: In a burst cycle a line flips iff this bit of its LFSR is 1.
BURST_FLIP_BIT = 15
#: :func:`lfsr_seed`'s constants.
LFSR_SEED_MULTIPLIER = 0x9E3779B1
LFSR_SEED_STRIDE = 0x85EBCA77


def lfsr_step(state: int) -> int:
    """One step of the injector's 32-bit Galois LFSR."""
    return (state >> 1) ^ (LFSR_TAPS if state & 1 else 0)


def lfsr_step_columns(steps: int) -> list[int]:
    """Column ``j``: the state after ``steps`` steps from state ``1 << j`` (the LFSR is linear over GF(2), so the
    state after ``steps`` steps is the XOR of the columns of the set bits)."""
    columns = []
    for j in range(32):
        state = 1 << j
        for _ in range(steps):
            state = lfsr_step(state)
        columns.append(state)
    return columns


def lfsr_step_matrix(steps: int) -> list[int]:
    """Bit ``i`` of the state after ``steps`` steps is the parity of ``state & masks[i]``."""
    columns = lfsr_step_columns(steps)
    return [sum(1 << j for j in range(32) if columns[j] >> i & 1) for i in range(32)]


def lfsr_seed(seed: int, line: int) -> int:
    """Initial state of line ``line``'s LFSR (``line = width``: the burst LFSR); never zero."""
    state = (seed * LFSR_SEED_MULTIPLIER + (line + 1) * LFSR_SEED_STRIDE) & 0xFFFFFFFF
    return state or 1


def ret_seed(seed: int) -> int:
    """Seed of a link's return channel: ``seed + 1``, or 1 if that reaches ``2**32``."""
    return seed + 1 if seed + 1 < (1 << 32) else 1


def link_seed(error_seed: int, k: int) -> int:
    """Seed of link ``k``'s forward channel: ``error_seed + 2k``, wrapped into ``1 .. 2**32 - 1``
    (``(error_seed - 1 + 2k) mod (2**32 - 1) + 1``). Its return channel takes :func:`ret_seed` of it (one more),
    so every channel of a system has its own seed, and link 0's are those of ``Link(arch)``."""
    return (error_seed - 1 + 2 * k) % ((1 << 32) - 1) + 1


def _check_rate(owner, error_rate):
    if isinstance(error_rate, bool) or not isinstance(error_rate, (int, float)):
        raise TypeError(f"{owner}: parameter 'error_rate' must be a number, got {error_rate!r}")
    if not 0.0 <= error_rate <= 0.5:
        raise ValueError(f"{owner}: parameter 'error_rate' = {error_rate} is outside 0.0..0.5")


def _check_burst(owner, burst_cycles):
    if isinstance(burst_cycles, bool) or not isinstance(burst_cycles, int):
        raise TypeError(f"{owner}: parameter 'burst_cycles' must be an integer, got {burst_cycles!r}")
    if not 1 <= burst_cycles <= 4096:
        raise ValueError(f"{owner}: parameter 'burst_cycles' = {burst_cycles} is outside 1..4096")


def line_threshold(owner: str, error_rate, burst_cycles: int = 1) -> int:
    """A line flips outside bursts when its LFSR's low 16 bits are below this: ``round(error_rate * 2**16)`` without
    bursts, 0 with bursts (``burst_cycles > 1``: every flip comes from a burst)."""
    _check_rate(owner, error_rate)
    _check_burst(owner, burst_cycles)
    threshold = round(error_rate * (1 << THRESHOLD_BITS))
    if error_rate > 0 and threshold == 0 and burst_cycles == 1:
        raise ValueError(f"{owner}: parameter 'error_rate' = {error_rate} is below the injector's resolution "
                         f"2**-{THRESHOLD_BITS + 1} (use 0.0 for no faults)")
    return threshold if burst_cycles == 1 else 0


def burst_threshold(owner: str, error_rate, burst_cycles: int) -> int:
    """A burst starts (none under way) when the burst LFSR's state is below this: ``round(2 * error_rate /
    burst_cycles * 2**32)``, at least 1 if ``error_rate > 0``; 0 without bursts (``burst_cycles = 1``). (Its
    resolution is 2**-32: with bursts any rate > 0 is representable, without them rates are multiples of 2**-16.)"""
    line_threshold(owner, error_rate, burst_cycles)
    if burst_cycles == 1 or error_rate == 0:
        return 0
    return min(max(1, round(2 * error_rate / burst_cycles * (1 << 32))), (1 << 32) - 1)


def channel_lines(bits: int) -> int:
    """Lines of a channel of ``bits`` data bits: data, ``valid``, ``first``."""
    return bits + 2


def channel_seeds(seed: int, bits: int) -> list[int]:
    """Initial LFSR states of a channel: lines ``0 .. width - 1``, then the burst LFSR."""
    return [lfsr_seed(seed, line) for line in range(channel_lines(bits) + 1)]


def reference_flips(seed: int, bits: int, error_rate, burst_cycles: int, cycles: int) -> list[int]:
    """Plain-Python golden model: the flip mask (bit ``b`` = line ``b``) of each of run cycles ``0 .. cycles - 1``."""
    width = channel_lines(bits)
    states = channel_seeds(seed, bits)
    line_t = line_threshold("reference_flips", error_rate, burst_cycles)
    burst_t = burst_threshold("reference_flips", error_rate, burst_cycles)
    masks, left = [], 0
    for _ in range(cycles):
        start = burst_t and left == 0 and states[width] < burst_t
        active = start or left > 0
        mask = 0
        for b in range(width):
            if (states[b] >> BURST_FLIP_BIT & 1) if active else (states[b] & 0xFFFF) < line_t:
                mask |= 1 << b
        masks.append(mask)
        left = burst_cycles - 1 if start else max(left - 1, 0)
        for b in range(width + 1):
            for _ in range(STEPS_PER_CYCLE):
                states[b] = lfsr_step(states[b])
    return masks


# --- CRCs -----------------------------------------------------------------------------------------------------
class CrcParams:
    """A CRC in the catalogue's terms (width, polynomial, initial value, reflections, final XOR)."""

    def __init__(self, width, polynomial, initial, reflect_input, reflect_output, xor_output):
        self.width, self.polynomial, self.initial = width, polynomial, initial
        self.reflect_input, self.reflect_output, self.xor_output = reflect_input, reflect_output, xor_output


#: The forward frames' CRC (CRC-32/ISO-HDLC, Ethernet) and the return messages' (CRC-16/IBM-3740).
CRC32_ISO_HDLC = CrcParams(32, 0x04C11DB7, 0xFFFFFFFF, True, True, 0xFFFFFFFF)
CRC16_IBM_3740 = CrcParams(16, 0x1021, 0xFFFF, False, False, 0x0000)


def _reverse(value: int, width: int) -> int:
    return int(format(value, f"0{width}b")[::-1], 2)


def crc_compute(params: CrcParams, data_width: int, words, *, linear: bool = False) -> int:
    """The CRC of ``words`` of ``data_width`` bits each (as :mod:`amaranth.lib.crc` computes it with that data
    width: each word reflected if ``reflect_input``, then fed most significant bit first). ``linear``: zero initial
    value and final XOR (the CRC's linear part, the difference two inputs' CRCs make)."""
    width, poly = params.width, params.polynomial
    top, mask = 1 << (width - 1), (1 << width) - 1
    crc = 0 if linear else params.initial
    for word in words:
        if params.reflect_input:
            word = _reverse(word, data_width)
        for i in range(data_width - 1, -1, -1):
            if ((crc & top) != 0) ^ (word >> i & 1):
                crc = ((crc << 1) ^ poly) & mask
            else:
                crc = (crc << 1) & mask
    if params.reflect_output:
        crc = _reverse(crc, width)
    return crc if linear else crc ^ params.xor_output
