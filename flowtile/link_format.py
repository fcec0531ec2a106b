"""The inter-chip link's geometry and timing contract (docs/architecture.md section 12): how many wire beats a frame
and a return message take, how sequence numbers count, and the fixed delays between the link's events. The hardware
(:mod:`flowtile.hdl.link`) implements these numbers and the emulator (:mod:`flowtile.emulator.timing`) computes
with them; neither imports the other.

A link carries the flits of one chip's host output to the next chip's host input, but only their ``data`` field
(``arch.flit_data_bits`` bits a flit: :attr:`LinkGeometry.flit_data_bits`): chip ``k``'s exit tile always sends to
tile (0,0) of chip ``k + 1`` (``dest_host = 1``, ``dest_row = dest_col = 0``; :meth:`flowtile.program.Program.validate`
checks it), so the receiver rebuilds every flit with ``dest_row = dest_col = 0`` and ``dest_host = 0`` and the
destination never crosses the wire. Frames never span inferences:
inference ``s``'s ``n`` flits (``Program.links[k].inference_flits``) form ``ceil(n / frame_flits)`` frames, all full
but the last. With faults off, the cycles of frame ``f`` (``f`` counted over the whole batch) are, with
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

from .arch import Arch

__all__ = ["LinkGeometry", "check_int", "FRAME_CRC_BITS", "MESSAGE_CRC_BITS", "ceil_log2"]

#: Width of a frame's CRC (CRC-32/ISO-HDLC, the Ethernet polynomial).
FRAME_CRC_BITS = 32
#: Width of a return message's CRC (CRC-16/IBM-3740).
MESSAGE_CRC_BITS = 16


def ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


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
        self.count_bits = max(1, ceil_log2(self.frame_flits))
        self.flits_bits = self.frame_flits * self.flit_data_bits
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

    def frames(self, inference_flits: int) -> int:
        """Frames of one inference of ``inference_flits`` flits (frames never span inferences)."""
        return -(-inference_flits // self.frame_flits)

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
