# Two entry points, each doing all set-up on a machine with only Python and pip:
#   make demo   train on scikit-learn's digits (device auto), write runs/digits/
#   make test   run the test suite
# PREINSTALL is installed first (CI pins torch there); EXTRAS picks the extras.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cli,test,fast,mkl
PREINSTALL ?=
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(PREINSTALL),$(BIN)/python -m pip install -q $(PREINSTALL))
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/gpubackprop train --dataset digits --hidden 128 64 --epochs 30 --device auto --out runs/digits

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The CPU benchmark: the pytest-benchmark suite (train steps, whole fit runs, the sgemm
# ceiling; JSON in bench/results/), then fit_bench's table of ratios for the README, and
# the estimators against scikit-learn's MLP on four small data sets (sklearn_datasets).
bench: $(STAMP)
	$(BIN)/python -m pytest -q bench/test_bench_cpu.py bench/test_fit_bench.py --benchmark-enable \
		--benchmark-json=bench/results/pytest-benchmark-cpu.json
	$(BIN)/python -m bench.fit_bench
	$(BIN)/python -m bench.sklearn_datasets

# On a machine with an NVIDIA GPU: selftest, the GPU tests and the step benchmark,
# every log and JSON into OUT (bench/gpu_check.sh), with the interpreter PYTHON
# that has gpubackprop and CuPy (pip install -e '.[cuda13,test,compare]').
# DEVICE=cpu runs the same stages on the CPU.
DEVICE ?= cuda
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh $(OUT) --device $(DEVICE)

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
