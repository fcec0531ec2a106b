"""The PE's parameter table, banked by lane (docs/architecture.md section 4, "Arithmetic": row ``o``
of the parameter table)."""
from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory, ReadPort, WritePort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from .layouts import param_layout

__all__ = ["ParamTable"]


class ParamTable(wiring.Component):
    """Parameter table of ``rows`` :func:`~flowtile.hdl.layouts.param_layout` rows, banked by lane
    (docs/architecture.md section 4, "Arithmetic", where row ``o`` holds ``(bias_o, M_o, S_o)``): row ``r`` lives in bank ``r % lanes`` at
    address ``r // lanes``, so that one read returns the ``lanes`` rows ``a*lanes .. a*lanes + lanes - 1``
    (LANE, ADD and CONCAT need rows ``cw*L + l`` of every lane ``l``; MAC picks row ``o`` from lane
    ``o % L``). Writes address rows; the banking is internal.

    ``write`` writes row ``write.addr`` in the cycle ``write.en`` is high. ``read`` is a synchronous
    port: ``read.data[l]`` is row ``a*lanes + l`` one cycle after ``read.addr = a`` (with ``read.en``);
    a row never written reads 0. Reads are not transparent to a write in the same cycle.

    ``read_skew`` (``k``, 0 if unused) reads the ``lanes`` consecutive rows from row ``a*lanes + k`` instead,
    for a context's parameter rows that start at an arbitrary ``param_base`` (docs/architecture.md section 4.6):
    bank ``l < k`` reads address ``a + 1``, the others ``a``, so ``read.data[l]`` is row ``a*lanes + l`` for
    ``l >= k`` and row ``(a + 1)*lanes + l`` for ``l < k`` (the data stay in bank order: row ``a*lanes + k + i``
    is ``read.data[(k + i) mod lanes]``). A bank whose address ``a + 1`` lies beyond its depth reads an
    unspecified row.

    Parameters
    ----------
    rows : int
        Rows of the table, ``>= 1``.
    lanes : int
        Banks, a power of two.

    Members
    -------
    write : ``Out(WritePort.Signature(addr_width=ceil_log2(rows), shape=param_layout()))``
    read : ``Out(ReadPort.Signature(addr_width=ceil_log2(ceil(rows / lanes)),
        shape=data.ArrayLayout(param_layout(), lanes)))``
    read_skew : ``In(range(lanes))``
        The first row's bank (with ``read.addr``).
    """

    def __init__(self, rows: int, lanes: int):
        for name, value in (("rows", rows), ("lanes", lanes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"ParamTable: parameter '{name}' must be a positive integer, got {value!r}")
        if lanes & (lanes - 1):
            raise ValueError(f"ParamTable: parameter 'lanes' = {lanes} must be a power of two")
        self.rows, self.lanes = rows, lanes
        self.bank_depth = -(-rows // lanes)
        super().__init__({
            "write": Out(WritePort.Signature(addr_width=ceil_log2(rows), shape=param_layout())),
            "read": Out(ReadPort.Signature(addr_width=ceil_log2(self.bank_depth),
                                                  shape=data.ArrayLayout(param_layout(), lanes))),
            "read_skew": In(range(lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        lane_bits = exact_log2(self.lanes)
        write_bank = self.write.addr[:lane_bits]
        for lane in range(self.lanes):
            m.submodules[f"bank{lane}"] = bank = Memory(shape=param_layout(), depth=self.bank_depth, init=[])
            bank_write, bank_read = bank.write_port(), bank.read_port()
            m.d.comb += [
                bank_write.addr.eq(self.write.addr >> lane_bits),
                bank_write.data.eq(self.write.data),
                bank_write.en.eq(self.write.en & (write_bank == lane)),
                # banks below the skew hold the window's last rows, one address further (never the last bank)
                bank_read.addr.eq(self.read.addr + (lane < self.read_skew) if lane < self.lanes - 1
                                  else self.read.addr),
                bank_read.en.eq(self.read.en),
                self.read.data[lane].eq(bank_read.data),
            ]
        return m
