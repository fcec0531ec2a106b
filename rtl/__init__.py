"""The RTL runner: the simulation harness around a chip, its Verilator (cocotb) and Amaranth-simulator flows, and
the encoding of a program into load-bus words. The only hardware code that reads a :class:`~flowtile.program.Program`."""
