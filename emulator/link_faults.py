"""Exact simulation of one inter-chip link with faults on (:class:`flowtile.hdl.link.Link`, fault model of
:mod:`flowtile.link_faults`): which frames the injector corrupts, CRC verdicts, NAKs, timeouts, go-back-N resends,
duplicates, corrupted return messages, resynchronization on ``first``, and the cycle of every event.

Why a cycle-stepped model. With faults the link's behaviour is no longer a set of max-plus recurrences: a resend's
timing depends on which beats a fault hit, which depends on the cycle the frame was sent in (a later send can dodge
a fault), a NAK on the message cadence, a timeout on a timer. So :func:`simulate_link` mirrors the RTL register by
register (the sender's assembler, replay window, serializer, timer and message deserializer; the two channels with
their injectors; the receiver's deserializer, credit buffer, NAK logic and message serializer), one cycle at a time,
given when chip ``k`` offers each flit and when chip ``k + 1``'s input FIFO has room for it. The injector's flips
come in bulk from numpy (:class:`ChannelFlips`: the LFSRs are linear over GF(2), so the states of a block of
cycles are powers of the step matrix applied to one state; flips are rare, only the cycles with a flip are kept).

Data. The timing does not depend on the flits' values, except through CRC verdicts. The model carries each beat
as a reference (frame, beat index) plus the data-line flips that hit it. A word the receiver assembles from the
beats 0 .. frame_beats - 1 of one frame (a resend carries the same bits) is checked exactly by the CRC's linearity:
it passes iff the flips in its CRC field equal the CRC's linear part of the flips in its payload (no flips: passes).
A word assembled from beats of different frames or idle wire (after a flipped ``valid`` or ``first``) is taken to
fail its CRC-32: it passes in the hardware with probability about 2**-32 (then the hardware itself delivers a wrong
frame). Return messages carry known values, so their words are built and checked bit for bit.

Cycle 0 is the first cycle with ``run = 1`` (the injector's run cycle 0); offers and rooms are cycle numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowtile.link_faults import (BURST_FLIP_BIT, CRC16_IBM_3740, CRC32_ISO_HDLC, STEPS_PER_CYCLE, burst_threshold,
                                  channel_lines, channel_seeds, crc_compute, lfsr_step_columns, line_threshold)
from flowtile.link_format import FRAME_CRC_BITS, MESSAGE_CRC_BITS, LinkGeometry, flit_lanes, frame_sizes

__all__ = ["ChannelFlips", "Checkpoints", "LinkRun", "simulate_link", "LINK_COUNTERS", "LinkSimulationError"]

#: Counters of a link run, named as the RTL's (:class:`flowtile.hdl.link.Link`: ``tx_*``, ``rx_*``, ``*_flips``),
#: plus ``undetected`` (frames accepted with flipped bits: 0 unless a CRC-32 misses an error).
LINK_COUNTERS = ("tx_frames_sent", "tx_replays", "tx_naks", "tx_timeouts", "tx_ret_crc_errors",
                 "rx_frames_accepted", "rx_crc_errors", "rx_seq_errors", "rx_duplicates", "rx_naks_sent",
                 "rx_overflows", "fwd_flips", "ret_flips", "undetected")

CHUNK = 4096


class LinkSimulationError(RuntimeError):
    """The link did not deliver every flit within the cycle budget."""


# --- the injector in bulk ----------------------------------------------------------------------------------------
def _tables(cols) -> np.ndarray:
    """Byte lookup tables of a GF(2) 32x32 matrix given by its columns: ``A x = XOR_k T[k][byte k of x]``."""
    cols = np.asarray(cols, dtype=np.uint32)
    tables = np.zeros((4, 256), dtype=np.uint32)
    values = np.arange(256)
    for k in range(4):
        for i in range(8):
            tables[k] ^= np.where(values >> i & 1, cols[8 * k + i], 0).astype(np.uint32)
    return tables


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (tables[0][x & 255] ^ tables[1][(x >> 8) & 255] ^ tables[2][(x >> 16) & 255]
            ^ tables[3][x >> 24])


_POWERS: list[np.ndarray] = []


def _power_tables(k: int) -> np.ndarray:
    """Tables of ``M^(2^k)``, ``M`` = one cycle (16 steps)."""
    if not _POWERS:
        _POWERS.append(_tables(lfsr_step_columns(STEPS_PER_CYCLE)))
    while len(_POWERS) <= k:
        last = _POWERS[-1]
        cols = _apply(last, _apply(last, np.array([1 << j for j in range(32)], dtype=np.uint32)))
        _POWERS.append(_tables(cols))
    return _POWERS[k]


class ChannelFlips:
    """The flip masks of one channel (seed, ``bits`` data bits, rate, burst length) by run cycle, generated a chunk
    of :data:`CHUNK` cycles at a time: ``mask(t)`` (bit ``b`` = line ``b``), ``count(until)`` the flips in cycles
    ``0 .. until``."""

    def __init__(self, seed: int, bits: int, error_rate, burst_cycles: int = 1):
        self.width = channel_lines(bits)
        self.line_t = line_threshold("ChannelFlips", error_rate, burst_cycles)
        self.burst_t = burst_threshold("ChannelFlips", error_rate, burst_cycles)
        self.burst_cycles = burst_cycles
        self.state = np.array(channel_seeds(seed, bits), dtype=np.uint32)
        self.masks: dict[int, int] = {}
        self.generated = 0           # cycles generated
        self.burst_until = 0         # a burst covers cycles < burst_until
        self.off = self.line_t == 0 and self.burst_t == 0
        self._log = CHUNK.bit_length() - 1

    def _chunk(self) -> None:
        c0, n = self.generated, CHUNK
        states = np.empty((n, len(self.state)), dtype=np.uint32)
        states[0] = self.state
        filled, k = 1, 0
        while filled < n:
            states[filled:2 * filled] = _apply(_power_tables(k), states[:filled])
            filled, k = 2 * filled, k + 1
        self.state = _apply(_power_tables(self._log), self.state)
        self.generated += n
        width, masks = self.width, self.masks
        weights = [1 << b for b in range(width)]
        if self.line_t:
            hit = (states[:, :width] & 0xFFFF) < self.line_t
            for row in np.flatnonzero(hit.any(axis=1)):
                masks[c0 + int(row)] = sum(weights[b] for b in np.flatnonzero(hit[row]))
        if self.burst_t:
            active = []
            if self.burst_until > c0:
                active.extend(range(c0, min(self.burst_until, c0 + n)))
            for row in np.flatnonzero(states[:, width] < self.burst_t):
                cycle = c0 + int(row)
                if cycle >= self.burst_until:
                    self.burst_until = cycle + self.burst_cycles
                    active.extend(range(cycle, min(self.burst_until, c0 + n)))
            if active:
                rows = np.array(active, dtype=np.int64) - c0
                bits = (states[rows, :width] >> BURST_FLIP_BIT) & 1
                for cycle, row in zip(active, bits):
                    mask = sum(weights[b] for b in np.flatnonzero(row))
                    if mask:
                        masks[cycle] = mask

    def ensure(self, until: int) -> None:
        """Generate the masks of cycles ``0 .. until``."""
        if self.off:
            return
        while self.generated <= until:
            self._chunk()

    def mask(self, t: int) -> int:
        if self.off:
            return 0
        if t >= self.generated:
            self.ensure(t)
        return self.masks.get(t, 0)

    def count(self, until: int) -> int:
        if self.off or until < 0:
            return 0
        self.ensure(until)
        return sum(bin(m).count("1") for t, m in self.masks.items() if t <= until)


# --- the link ----------------------------------------------------------------------------------------------------
@dataclass
class LinkRun:
    """What :func:`simulate_link` finds: per flit ``accept`` (the sender takes it) and ``deliver`` (written into
    the next chip), per frame ``close``, ``send`` (its first load into the serializer), ``received`` (the receiver
    accepts it), all int64; ``sends``: every load ``(cycle, frame)`` in order (resends included); ``counters``
    (:data:`LINK_COUNTERS`) as they stand after cycle ``end``; ``end``."""

    accept: np.ndarray
    deliver: np.ndarray
    close: np.ndarray
    send: np.ndarray
    received: np.ndarray
    sends: list = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    end: int = 0


class _Crc32Linear:
    """The CRC-32's linear part, per flipped payload bit, memoized."""

    def __init__(self, bits: int, payload_beats: int):
        self.bits, self.beats, self.cache = bits, payload_beats, {}

    def of(self, position: int) -> int:
        value = self.cache.get(position)
        if value is None:
            word = 1 << position
            words = [word >> (i * self.bits) & ((1 << self.bits) - 1) for i in range(self.beats)]
            value = self.cache[position] = crc_compute(CRC32_ISO_HDLC, self.bits, words, linear=True)
        return value


def batch_frame_sizes(geometry: LinkGeometry, inference_flits: int, segments, total: int) -> list[int]:
    """Static framing over a run: the sizes of the frames of ``total`` flits, inferences of ``inference_flits``
    (0: no inference boundary, every frame as full as the lane table allows) with lane table ``segments``
    (:meth:`~flowtile.link_format.LinkGeometry.inference_frame_sizes`; frames never span inferences). A trailing
    partial inference's last frame is taken to close after its last flit; the hardware would wait for the flits that
    complete it (programs always run whole inferences, so only a unit test of the link can tell)."""
    if inference_flits == 0:
        return frame_sizes(flit_lanes(segments, total, geometry.lanes), geometry.frame_bytes).tolist()
    per = geometry.inference_frame_sizes(inference_flits, segments).tolist()
    whole, rest = divmod(total, inference_flits)
    sizes = per * whole
    if rest:
        sizes += np.minimum(per, np.maximum(0, rest - np.concatenate(([0], np.cumsum(per)[:-1])))).tolist()
    return [size for size in sizes if size]


class Checkpoints:
    """Snapshots of one link's simulation (every :data:`SNAPSHOT_CYCLES` cycles) and the inputs it ran on, so that a
    run on new offers and rooms restarts from the last snapshot before the first cycle they change (the simulation
    is causal: cycle ``t`` reads offers and rooms only through ``offers[i] <= t``, ``rooms[i] <= t``). Pass the same
    object to successive :func:`simulate_link` calls of one link (same geometry, framing, flips, timeout)."""

    def __init__(self):
        self.offers = self.rooms = None
        self.snapshots: list[tuple] = []       # (t, state), increasing t
        self.outputs = None


#: Cycles between two snapshots of :class:`Checkpoints`.
SNAPSHOT_CYCLES = 2048


def simulate_link(geometry: LinkGeometry, inference_flits: int, offers, rooms, *, segments=(), fwd: ChannelFlips,
                  ret: ChannelFlips, timeout_cycles: int | None = None, end: int | None = None,
                  max_cycles: int | None = None, checkpoints: Checkpoints | None = None,
                  deliver_gap: int = 1, deliver_ready=None) -> LinkRun:
    """Run the link of ``geometry`` (static framing with ``inference_flits`` per inference and lane table
    ``segments``, :func:`batch_frame_sizes`) on ``len(offers)``
    flits: chip ``k`` offers flit ``i`` from cycle ``offers[i]`` on, chip ``k + 1`` has room for it from cycle
    ``rooms[i]`` on (both non-decreasing in the hardware; any int). ``fwd`` / ``ret``: the channels' flips.
    Runs until every flit is delivered and, if ``end`` is given, through cycle ``end`` (the counters are those
    after it). ``max_cycles``: budget (default generous); exceeded raises :class:`LinkSimulationError`.
    ``checkpoints``: reuse the snapshots of earlier runs of this link (:class:`Checkpoints`); same result.
    ``deliver_gap``: cycles at least between two deliveries (2 into a FIFO of depth 1 whose reader the caller does
    not model: rule 1 implies it, docs/architecture.md section 6). ``deliver_ready``: None (the next chip or the host
    may take a flit in every cycle its room allows), or a bool pattern repeating every ``len(deliver_ready)``
    cycles: a flit is delivered only in cycles ``t`` with ``deliver_ready[t % len]`` (a ring's return link into a
    host output that a host pattern stalls, :class:`flowtile.host.HostPattern`)."""
    g = geometry
    F, FB, S, W, L = g.frame_flits, g.frame_beats, g.seq_bits, g.bits, g.latency
    RB, MB, PB = g.ret_beats, g.msg_beats, g.payload_beats
    MOD, HALF = 1 << S, 1 << (S - 1)
    R, C = g.replay_frames, g.credit_frames
    T = g.default_timeout() if timeout_cycles is None else timeout_cycles
    offers_array, rooms_array = np.asarray(offers, dtype=np.int64), np.asarray(rooms, dtype=np.int64)
    offers, rooms = offers_array.tolist(), rooms_array.tolist()
    ready = None if deliver_ready is None else [bool(b) for b in np.asarray(deliver_ready, dtype=bool)]
    ready_period = 1 if ready is None else len(ready)
    if ready is not None and not any(ready):
        raise ValueError("simulate_link: deliver_ready needs at least one ready cycle per period")
    total = len(offers)
    sizes = batch_frame_sizes(g, inference_flits, segments, total)
    n_frames = len(sizes)
    frame_first = [0] * n_frames
    for f in range(1, n_frames):
        frame_first[f] = frame_first[f - 1] + sizes[f - 1]
    if max_cycles is None:
        horizon = max([0] + [x for x in offers + rooms if x < (1 << 40)])
        max_cycles = horizon + (n_frames + 4) * (4 * FB + 2 * L + 4 * RB + 2 * T) * 4 + 10_000
        if ready is not None:   # each delivery may wait out the pattern's longest run of stalled cycles
            stalled = longest = 0
            for bit in ready + ready:
                stalled = 0 if bit else stalled + 1
                longest = max(longest, stalled)
            max_cycles += total * (longest + 1)
    data_mask = (1 << W) - 1
    valid_bit, first_bit = 1 << W, 1 << (W + 1)
    crc_lin = _Crc32Linear(W, PB)
    crc_field = PB * W
    payload_mask = (1 << crc_field) - 1
    msg_field = MB * W
    msg_cache: dict[int, int] = {}

    def encode_message(ack, freed, nak):
        value = ack | freed << S | nak << (2 * S)
        key = value
        word = msg_cache.get(key)
        if word is None:
            beats = [value >> (i * W) & data_mask for i in range(MB)]
            word = value | crc_compute(CRC16_IBM_3740, W, beats) << msg_field
            msg_cache[key] = word
        return word

    msg_check: dict[int, bool] = {}

    def message_ok(word):
        ok = msg_check.get(word)
        if ok is None:
            payload = word & ((1 << msg_field) - 1)
            beats = [payload >> (i * W) & data_mask for i in range(MB)]
            ok = msg_check[word] = (crc_compute(CRC16_IBM_3740, W, beats) == (word >> msg_field) & 0xFFFF)
        return ok

    accept, deliver = [None] * total, [None] * total
    close, first_send, received = [None] * n_frames, [None] * n_frames, [None] * n_frames
    sends = []
    cnt = dict.fromkeys(LINK_COUNTERS, 0)

    # TX registers
    asm_count = taken = 0
    next_seq = send_seq = ack_base = freed = 0
    closed = 0                                  # frames closed (unwrapped next_seq)
    ser_active, ser_index, ser_frame = False, 0, 0
    timer = 0
    # TX message deserializer
    md_index, md_word = 0, 0
    md_valid, md_ok, md_out = False, False, 0
    # forward wire history: cycle -> (first, frame, beat)
    txw: dict[int, tuple] = {}
    # RX
    rd_index, rd_beats = 0, []
    rd_valid, rd_out = False, None              # registered word: (crc_ok, seq, count_m1, frame, corrupted)
    rx_next = rx_freed = 0
    buffer = []                                 # accepted frames not yet emptied: (count_m1, frame)
    out_index = 0
    delivered = 0
    nak_pending = nak_sent = False
    messages = []                               # encoded message m
    t = 0
    limit = max_cycles
    snapshots = []
    if checkpoints is not None:
        restart = None
        if checkpoints.offers is not None and len(checkpoints.offers) == total:
            restart = 1 << 62
            for old, new in ((checkpoints.offers, offers_array), (checkpoints.rooms, rooms_array)):
                differ = np.flatnonzero(old != new)
                if differ.size:
                    restart = min(restart, int(np.minimum(old[differ], new[differ]).min()))
        snapshots = checkpoints.snapshots if restart is not None else []
        while snapshots and snapshots[-1][0] > restart:
            snapshots.pop()
        checkpoints.snapshots, checkpoints.offers, checkpoints.rooms = snapshots, offers_array, rooms_array
        if snapshots:
            accept, deliver, close, first_send, received, sends, messages = checkpoints.outputs
            (t, state, txw, rd_beats, buffer, cnt, n_messages, n_sends) = snapshots[-1][1:]
            (asm_count, taken, next_seq, send_seq, ack_base, freed, closed, ser_active, ser_index, ser_frame,
             timer, md_index, md_word, md_valid, md_ok, md_out, rd_index, rd_valid, rd_out, rx_next, rx_freed,
             out_index, delivered, nak_pending, nak_sent) = state
            txw, rd_beats, buffer, cnt = dict(txw), list(rd_beats), list(buffer), dict(cnt)
            del messages[n_messages:]
            del sends[n_sends:]
            for f, cycle in enumerate(first_send):
                if cycle is not None and cycle >= t:
                    first_send[f] = None
        checkpoints.outputs = (accept, deliver, close, first_send, received, sends, messages)
    next_snapshot = (t // SNAPSHOT_CYCLES + 1) * SNAPSHOT_CYCLES if checkpoints is not None else 1 << 62
    while True:
        if t >= next_snapshot:
            next_snapshot += SNAPSHOT_CYCLES
            state = (asm_count, taken, next_seq, send_seq, ack_base, freed, closed, ser_active, ser_index,
                     ser_frame, timer, md_index, md_word, md_valid, md_ok, md_out, rd_index, rd_valid, rd_out,
                     rx_next, rx_freed, out_index, delivered, nak_pending, nak_sent)
            snapshots.append((t, t, state, dict(txw), list(rd_beats), list(buffer), dict(cnt), len(messages),
                              len(sends)))
        if delivered == total and (end is None or t > end):
            break
        if t > limit:
            raise LinkSimulationError(f"the link did not deliver its {total} flits within {limit} cycles "
                                      f"({delivered} delivered)")
        # ---------------- TX, combinational from the registers of cycle t ------------------------------------
        closed_start, next_seq_start = closed, next_seq
        size = sizes[closed] if closed < n_frames else F
        take = asm_count < size and taken < total and offers[taken] <= t
        window_full = (next_seq - ack_base) % MOD >= R
        do_close = (not window_full) and asm_count == size
        can_send = send_seq != next_seq and (send_seq - freed) % MOD < C
        ser_free = (not ser_active) or ser_index == FB - 1
        sent = can_send and ser_free
        if ser_active:
            txw[t] = (ser_index == 0, ser_frame, ser_index)
        # message at the sender (registered word of the deserializer)
        use = advance = nak = overtaken = False
        msg_ack = msg_freed = 0
        if md_valid:
            if md_ok:
                msg_ack, msg_freed, msg_nak = md_out & (MOD - 1), md_out >> S & (MOD - 1), md_out >> (2 * S) & 1
                if (msg_ack - ack_base) % MOD <= (next_seq - ack_base) % MOD:
                    use = True
                    advance = msg_ack != ack_base
                    nak = bool(msg_nak)
                    overtaken = (msg_ack - ack_base) % MOD > (send_seq - ack_base) % MOD
            else:
                cnt["tx_ret_crc_errors"] += 1
        timeout = False
        if send_seq == ack_base or advance:
            new_timer = 0
        elif timer == T - 1:
            new_timer, timeout = 0, True
        else:
            new_timer = timer + 1
        # ---------------- forward channel output and RX deserializer ------------------------------------------
        base = txw.pop(t - L, None) if t >= L else None
        mask = fwd.mask(t)
        valid = base is not None
        first = valid and base[0]
        if mask:
            if mask & valid_bit:
                valid = not valid
            if mask & first_bit:
                first = not first
        new_rd_valid, new_rd_out = False, rd_out
        if valid and (first or rd_index != 0):
            position = 0 if first else rd_index
            if position == 0:
                rd_beats = []
            rd_beats.append((base, mask & data_mask))
            if position == FB - 1:
                new_rd_valid, new_rd_out = True, _check_word(rd_beats, FB, W, S, g.count_bits, sizes, crc_lin,
                                                             crc_field, payload_mask, MOD)
                rd_index = 0
            else:
                rd_index = position + 1
        # ---------------- RX, combinational -------------------------------------------------------------------
        rx_accept = False
        nak_request = False
        if rd_valid:
            crc_ok, seq, count_m1, frame, corrupted = rd_out
            room = (rx_next - rx_freed) % MOD < C
            if crc_ok and seq == rx_next and room:
                rx_accept = True
            elif not crc_ok:
                cnt["rx_crc_errors"] += 1
                nak_request = True
            elif seq == rx_next:
                cnt["rx_overflows"] += 1
            elif (seq - rx_next) % MOD < HALF:
                cnt["rx_seq_errors"] += 1
                nak_request = True
            else:
                cnt["rx_duplicates"] += 1
        out_valid = rx_next != rx_freed
        deliver_now = out_valid and delivered < total and rooms[delivered] <= t and (
            deliver_gap == 1 or delivered == 0 or deliver[delivered - 1] + deliver_gap <= t) and (
            ready is None or ready[t % ready_period])
        msg_load = t % RB == 0                  # the message serializer is free (run from cycle 0)
        if msg_load:
            messages.append(encode_message(rx_next, rx_freed, 1 if nak_pending else 0))
        # ---------------- return channel output and the sender's message deserializer --------------------------
        tr = t - L                               # the cycle the beat left the receiver
        if tr >= 1:
            m_index, beat = divmod(tr - 1, RB)
            r_valid, r_first = True, beat == 0
            r_data = messages[m_index] >> (beat * W) & data_mask
        else:
            r_valid = r_first = False
            r_data = 0
        rmask = ret.mask(t)
        if rmask:
            r_data ^= rmask & data_mask
            if rmask & valid_bit:
                r_valid = not r_valid
            if rmask & first_bit:
                r_first = not r_first
        new_md_valid = False
        if r_valid and (r_first or md_index != 0):
            position = 0 if r_first else md_index
            md_word = (md_word >> W) | (r_data << ((RB - 1) * W)) if RB > 1 else r_data
            if position == RB - 1:
                new_md_valid, md_ok, md_out = True, message_ok(md_word), md_word & ((1 << (2 * S + 1)) - 1)
                md_index = 0
            else:
                md_index = position + 1
        # ---------------- register updates (the edge after cycle t) -------------------------------------------
        if take:
            accept[taken] = t
            taken += 1
            asm_count += 1
        if do_close:
            close[closed] = t
            closed += 1
            next_seq = (next_seq + 1) % MOD
            asm_count = 0
        if ser_active:
            if ser_index == FB - 1:
                ser_active = False
            else:
                ser_index += 1
        if sent:
            # the unwrapped frame at send_seq (within the window behind next_seq, as they stood in cycle t)
            frame = closed_start - (next_seq_start - send_seq) % MOD
            ser_active, ser_index, ser_frame = True, 0, frame
            sends.append((t, frame))
            if first_send[frame] is None:
                first_send[frame] = t
            cnt["tx_frames_sent"] += 1
            send_seq = (send_seq + 1) % MOD
        if use:
            if (msg_freed - freed) % MOD <= (msg_ack - freed) % MOD:
                freed = msg_freed
            ack_base_old = ack_base
            ack_base = msg_ack
        else:
            ack_base_old = ack_base
        timer = new_timer
        if nak:
            cnt["tx_naks"] += 1
        if timeout and not nak:
            cnt["tx_timeouts"] += 1
        if nak or timeout:
            cnt["tx_replays"] += 1
            send_seq = msg_ack if nak else ack_base_old
        elif overtaken:
            send_seq = msg_ack
        md_valid = new_md_valid
        # RX
        if rx_accept:
            crc_ok, seq, count_m1, frame, corrupted = rd_out
            if cnt["rx_frames_accepted"] < n_frames:
                received[cnt["rx_frames_accepted"]] = t
            buffer.append((count_m1, frame))
            rx_next = (rx_next + 1) % MOD
            cnt["rx_frames_accepted"] += 1
            if corrupted:
                cnt["undetected"] += 1
        if deliver_now:
            deliver[delivered] = t
            delivered += 1
            if out_index == buffer[0][0]:
                out_index = 0
                buffer.pop(0)
                rx_freed = (rx_freed + 1) % MOD
            else:
                out_index += 1
        if msg_load and nak_pending:
            nak_pending, nak_sent = False, True
            cnt["rx_naks_sent"] += 1
        elif nak_request and not nak_sent and not nak_pending:
            nak_pending = True
        if rx_accept:
            nak_pending = nak_sent = False
        rd_valid, rd_out = new_rd_valid, new_rd_out
        t += 1
    last = t - 1
    cnt["fwd_flips"] = fwd.count(last)
    cnt["ret_flips"] = ret.count(last)
    as_array = lambda values: np.array([-1 if v is None else v for v in values], dtype=np.int64)  # noqa: E731
    return LinkRun(accept=as_array(accept), deliver=as_array(deliver), close=as_array(close),
                   send=as_array(first_send), received=as_array(received), sends=list(sends), counters=cnt,
                   end=last)


def _check_word(beats, FB, W, S, count_bits, sizes, crc_lin, crc_field, payload_mask, MOD):
    """The receiver's verdict on a word of ``FB`` beats ``(reference, data flips)``: ``(crc_ok, seq, count - 1,
    frame or None, corrupted)``. Aligned words (beats 0 .. FB-1 of one frame) exactly; mixed words fail."""
    ref = beats[0][0]
    frame = None if ref is None else ref[1]
    aligned = frame is not None and all(b[0] is not None and b[0][1] == frame and b[0][2] == i
                                        for i, b in enumerate(beats))
    if not aligned:
        return (False, 0, 0, None, True)
    error = 0
    for i, (_, flips) in enumerate(beats):
        if flips:
            error |= flips << (i * W)
    seq, count_m1 = frame % MOD, sizes[frame] - 1
    if not error:
        return (True, seq, count_m1, frame, False)
    payload_error = error & payload_mask
    crc_error = error >> crc_field & 0xFFFFFFFF
    linear = 0
    e = payload_error
    while e:
        low = e & -e
        linear ^= crc_lin.of(low.bit_length() - 1)
        e ^= low
    if linear != crc_error:
        return (False, 0, 0, frame, True)
    # undetected: the hardware takes the flipped seq and count
    seq ^= payload_error & (MOD - 1)
    count_m1 ^= payload_error >> S & ((1 << count_bits) - 1)
    return (True, seq, count_m1, frame, payload_error != 0)
