"""The inter-chip link's geometry and timing contract (docs/architecture.md section 12): how many wire beats a frame
and a return message take, how sequence numbers count, and the fixed delays between the link's events. The hardware
(:mod:`flowtile.hdl.link`) implements these numbers and the emulator (:mod:`flowtile.emulator.timing`) computes
with them; neither imports the other.

A link carries the flits of one chip's host output to the next chip's host input, but only their ``data`` field
(``arch.flit_data_bits`` bits a flit: :attr:`LinkGeometry.flit_data_bits`): chip ``k``'s exit tile always sends to
tile (0,0) of chip ``k + 1`` (``dest_host = 1``, ``dest_row = dest_col = 0``; :meth:`flowtile.program.Program.validate`
checks it), so the receiver rebuilds every flit with ``dest_row = dest_col = 0`` and ``dest_host = 0`` and the
destination never crosses the wire.

**Dense frames.** Nor do a flit's channel-padding lanes: a link's *lane table* (:class:`LaneSegment`, at most
:data:`LINK_LANE_SEGMENTS` of them, ``Program.links[k].segments``) says how many lanes each flit of an inference
carries (:func:`flit_lanes`: a feature map of ``C`` channels is pixels of ``ceil(C / L)`` words whose last word holds
``C - (ceil(C / L) - 1) * L`` channels; flits past the table carry all ``L``). A frame's data area is ``frame_bytes =
frame_flits * L`` bytes holding the carried lanes of its flits back to back (flit order, lane 0 first, from bit 0;
the rest zero) and the receiver rebuilds each flit with its other lanes zero. Frames never span inferences: a flit
joins the open frame iff it belongs to the same inference and its lanes still fit (:func:`frame_sizes`, greedy),
so the frames are fixed by the program, never by when flits arrive; with every lane carried an inference's ``n``
flits (``Program.links[k].inference_flits``) form ``ceil(n / frame_flits)`` frames, all full but the last.

With faults off, the cycles of frame ``f`` (``f`` counted over the whole batch) are, with
``FB = frame_beats``, ``RB = ret_beats``, ``L = latency``:

* ``close_f``: the sender seals frame ``f`` into its replay buffer, the first cycle with ``close_f >=
  accept(last flit of f) + 1``, ``close_f >= close_{f-1} + 1`` and ``close_f >= ack_seen(f - replay_frames)``;
  the sender takes the first flit of frame ``f + 1`` no earlier than ``close_f + 1``;
* ``send_f``: the serializer loads frame ``f``: ``send_f >= close_f + 1``, ``send_f >= send_{f-1} + FB`` and
  ``send_f >= freed_seen(f - credit_frames)``; beat ``b`` is on the sender's wire in ``send_f + 1 + b``;
* the receiver has the whole frame and accepts it in ``send_f + FB + L + 1`` (:attr:`LinkGeometry.accept_delay`
  after ``send_f``); its first flit is offered from the cycle after, the others one a cycle (each when the next
  chip's input FIFO takes it);
* return messages: the receiver starts message ``m`` in cycle ``m * RB`` of the run (cycle 0 is the first cycle
  with ``run = 1``), carrying its counters as they stand in that cycle; the sender's registers hold them from
  ``m * RB + RB + L + 2`` (:attr:`LinkGeometry.message_delay` after the start). So with ``next_message(t)`` the
  first ``m * RB >= t``: ``ack_seen(g) = next_message(accept_g + 1) + message_delay`` and ``freed_seen(g) =
  next_message(deliver(last flit of g) + 1) + message_delay``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .arch import Arch

__all__ = ["LinkGeometry", "check_int", "FRAME_CRC_BITS", "MESSAGE_CRC_BITS", "ceil_log2", "LaneSegment",
           "LINK_LANE_SEGMENTS", "LANE_SEGMENT_FLITS_BITS", "LANE_SEGMENT_PERIOD_BITS", "flit_lanes", "frame_sizes",
           "check_lane_table", "encode_lane_segment", "lane_segments_of_tensors"]

#: Width of a frame's CRC (CRC-32/ISO-HDLC, the Ethernet polynomial).
FRAME_CRC_BITS = 32
#: Width of a return message's CRC (CRC-16/IBM-3740).
MESSAGE_CRC_BITS = 16


#: Segments in a link's lane table (link registers 1 .. LINK_LANE_SEGMENTS; a residual block's two tensors plus the
#: copies' inputs and outputs of replication fit, and a longer stream falls back to carrying every lane).
LINK_LANE_SEGMENTS = 4
#: Widths of a lane segment's ``flits`` and ``period`` in its register (:func:`encode_lane_segment`).
LANE_SEGMENT_FLITS_BITS = 24
LANE_SEGMENT_PERIOD_BITS = 16


def ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class LaneSegment:
    """``flits`` consecutive flits of an inference's stream made of pixels of ``period`` words each: flit ``i`` of
    the segment carries ``last_lanes`` lanes (0 .. ``last_lanes - 1``) if ``i mod period == period - 1`` (a
    pixel's last word), all ``L`` otherwise."""

    flits: int
    period: int
    last_lanes: int

    def to_list(self) -> list[int]:
        return [self.flits, self.period, self.last_lanes]


def check_lane_table(segments: Sequence[LaneSegment], inference_flits: int, lanes: int, owner: str = "lane table"):
    """ValueError naming the segment and field unless ``segments`` is a valid lane table for inferences of
    ``inference_flits`` flits (0: no inference boundary) of ``lanes`` lanes."""
    if len(segments) > LINK_LANE_SEGMENTS:
        raise ValueError(f"{owner}: {len(segments)} lane segments, a link holds at most {LINK_LANE_SEGMENTS}")
    total = 0
    for index, segment in enumerate(segments):
        if not isinstance(segment, LaneSegment):
            raise ValueError(f"{owner}: segment {index} must be a LaneSegment, got {segment!r}")
        for name, value, low, high in (("flits", segment.flits, 1, (1 << LANE_SEGMENT_FLITS_BITS) - 1),
                                       ("period", segment.period, 1, (1 << LANE_SEGMENT_PERIOD_BITS) - 1),
                                       ("last_lanes", segment.last_lanes, 1, lanes)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise ValueError(f"{owner}: segment {index} field '{name}' = {value!r} is outside {low}..{high}")
        total += segment.flits
    if inference_flits and total > inference_flits:
        raise ValueError(f"{owner}: the segments cover {total} flits, more than the {inference_flits} flits of an "
                         f"inference")


def encode_lane_segment(segment: LaneSegment | None, lanes: int) -> int:
    """A segment as its link register's value: ``flits`` in bits ``[0, 24)``, ``period`` in ``[24, 40)``,
    ``last_lanes`` from bit 40 (``None``: 0, an unused register)."""
    if segment is None:
        return 0
    check_lane_table([segment], 0, lanes)
    return (segment.flits | segment.period << LANE_SEGMENT_FLITS_BITS
            | segment.last_lanes << (LANE_SEGMENT_FLITS_BITS + LANE_SEGMENT_PERIOD_BITS))


def flit_lanes(segments: Sequence[LaneSegment], count: int, lanes: int) -> np.ndarray:
    """Lanes carried by each of the first ``count`` flits of an inference (int64 ``[count]``): the segments in
    order, then ``lanes`` for every flit after them (the one definition; the hardware's lane sequencer follows it,
    the emulator computes with it)."""
    carried = np.full(count, lanes, dtype=np.int64)
    start = 0
    for segment in segments:
        stop = min(start + segment.flits, count)
        if stop <= start:
            break
        index = np.arange(stop - start)
        carried[start:stop] = np.where(index % segment.period == segment.period - 1, segment.last_lanes, lanes)
        start = stop
    return carried


def frame_sizes(carried: np.ndarray, frame_bytes: int) -> np.ndarray:
    """Flits of each frame of one inference whose flits carry ``carried`` lanes (bytes) each, frames of
    ``frame_bytes`` bytes: greedy, a flit joins the open frame iff its bytes still fit (every flit carries at most
    ``frame_bytes``). With every lane carried this is ``frame_flits`` flits a frame, the last one the rest."""
    total = len(carried)
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    if np.all(carried == carried[0]):
        per = frame_bytes // int(carried[0])
        sizes = np.full(total // per, per, dtype=np.int64)
        return np.append(sizes, total % per) if total % per else sizes
    cumulative = np.concatenate(([0], np.cumsum(carried)))
    sizes = []
    start = 0
    while start < total:
        stop = int(np.searchsorted(cumulative, cumulative[start] + frame_bytes, side="right")) - 1
        sizes.append(stop - start)
        start = stop
    return np.asarray(sizes, dtype=np.int64)


def lane_segments_of_tensors(tensors: Sequence[tuple[int, int]], lanes: int) -> tuple[tuple[LaneSegment, ...], int]:
    """The lane table of a stream made of ``tensors`` in order, each ``(pixels, channels)`` laid out pixel-major
    with ``ceil(channels / lanes)`` words a pixel, and its flits per inference. Tensors of the same layout merge
    into one segment; a tensor whose every lane is used needs no segment of its own when it ends the stream. A
    stream needing more than :data:`LINK_LANE_SEGMENTS` segments keeps the first ones and carries every lane of the
    rest (the table must end in a merged full-lane tail, which costs only link bandwidth)."""
    segments: list[LaneSegment] = []
    total = 0
    for pixels, channels in tensors:
        period = -(-channels // lanes)
        last = channels - (period - 1) * lanes
        flits = pixels * period
        total += flits
        if flits == 0:
            continue
        if last == lanes:
            period = 1
        if segments and (segments[-1].period, segments[-1].last_lanes) == (period, last):
            segments[-1] = LaneSegment(segments[-1].flits + flits, period, last)
        else:
            segments.append(LaneSegment(flits, period, last))
    while segments and segments[-1].last_lanes == lanes:
        segments.pop()
    if len(segments) > LINK_LANE_SEGMENTS:
        segments = segments[:LINK_LANE_SEGMENTS - 1]
        while segments and segments[-1].last_lanes == lanes:
            segments.pop()
    return tuple(segments), total


class LinkGeometry:
    """Frame and message geometry of a link of ``arch``, and its fixed delays.

    Parameters default to ``arch``'s ``link_*`` fields; ``owner`` names the caller in validation messages."""

    def __init__(self, arch: Arch, *, bits=None, frame_flits=None, credit_frames=None, replay_frames=None,
                 latency=None, owner="LinkGeometry"):
        if not isinstance(arch, Arch):
            raise TypeError(f"{owner}: parameter 'arch' must be a flowtile.arch.Arch, got {arch!r}")
        self.arch = arch
        self.bits = check_int(owner, "bits", arch.link_bits if bits is None else bits, 1, 1024)
        self.frame_flits = check_int(owner, "frame_flits",
                                      arch.link_frame_flits if frame_flits is None else frame_flits, 1, 64)
        self.credit_frames = check_int(owner, "credit_frames",
                                        arch.link_credit_frames if credit_frames is None else credit_frames, 1, 256)
        self.replay_frames = check_int(owner, "replay_frames",
                                        arch.link_replay_frames if replay_frames is None else replay_frames, 1, 256)
        self.latency = check_int(owner, "latency", arch.link_latency_cycles if latency is None else latency,
                                  1, 65536)
        #: Bits a flit takes in a frame: its data only (the receiver rebuilds the destination, tile (0,0)).
        self.flit_data_bits = arch.flit_data_bits
        self.replay_depth = 1 << ceil_log2(self.replay_frames)
        self.credit_depth = 1 << ceil_log2(self.credit_frames)
        self.seq_bits = max(ceil_log2(2 * (self.replay_frames + self.credit_frames)),
                            ceil_log2(self.replay_depth), ceil_log2(self.credit_depth), 1)
        self.lanes = arch.lanes
        #: Bytes of a frame's data area: the carried lanes of its flits back to back (dense frames).
        self.frame_bytes = self.frame_flits * arch.lanes
        #: A frame holds up to ``frame_bytes`` flits (one lane each): its ``count - 1`` field is this wide.
        self.count_bits = max(1, ceil_log2(self.frame_bytes))
        self.flits_bits = self.frame_bytes * 8
        self.payload_bits = self.seq_bits + self.count_bits + self.flits_bits
        self.payload_beats = -(-self.payload_bits // self.bits)
        self.crc_beats = -(-FRAME_CRC_BITS // self.bits)
        self.frame_beats = self.payload_beats + self.crc_beats
        self.msg_bits = 2 * self.seq_bits + 1
        self.msg_beats = -(-self.msg_bits // self.bits)
        self.ret_beats = self.msg_beats + -(-MESSAGE_CRC_BITS // self.bits)

    # --- throughput and timing --------------------------------------------------------------------------
    @property
    def flits_per_cycle(self) -> float:
        """Steady-state throughput with full frames and enough credit: ``frame_flits / frame_beats``."""
        return self.frame_flits / self.frame_beats

    def frames(self, inference_flits: int, segments: Sequence[LaneSegment] = ()) -> int:
        """Frames of one inference of ``inference_flits`` flits with lane table ``segments`` (frames never span
        inferences)."""
        return len(self.inference_frame_sizes(inference_flits, segments))

    def inference_frame_sizes(self, inference_flits: int, segments: Sequence[LaneSegment] = ()) -> np.ndarray:
        """Flits of each frame of one inference (:func:`frame_sizes` of :func:`flit_lanes`)."""
        return frame_sizes(flit_lanes(segments, inference_flits, self.lanes), self.frame_bytes)

    @property
    def accept_delay(self) -> int:
        """Cycles from ``send_f`` (the serializer loads the frame) to the receiver accepting it: ``FB`` beats from
        the cycle after, ``L`` wire stages, one cycle in the deserializer."""
        return self.frame_beats + self.latency + 1

    @property
    def message_period(self) -> int:
        """Cycles between the starts of two return messages (they go back to back)."""
        return self.ret_beats

    @property
    def message_delay(self) -> int:
        """Cycles from the start of a return message to the sender's registers holding its counters: ``RB`` beats
        from the cycle after, ``L`` wire stages, one cycle in the deserializer, one to update the register."""
        return self.ret_beats + self.latency + 2

    def default_timeout(self, latency: int | None = None) -> int:
        """Cycles without ack progress after which the sender goes back: a generous round trip (longer than any
        fault-free ack delay, so a clean link never times out)."""
        latency = self.latency if latency is None else latency
        return 2 * self.frame_beats + 2 * latency + 3 * (self.ret_beats + 1) + 16


def check_int(owner, name, value, low, high):
    """``value`` if it is an integer in ``low..high``; else TypeError/ValueError naming ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: parameter '{name}' must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{owner}: parameter '{name}' = {value} is outside {low}..{high}")
    return value
