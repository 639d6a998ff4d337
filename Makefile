# Quick start:  make demo   (build + run the demo)      make test   (everything CI runs)
# Both create .venv on first use (torch from PyPI: a few GB, cached by pip afterwards).

VENV ?= .venv
PY := $(VENV)/bin/python
WHEEL_DIR := target/wheels-dist
export PYO3_PYTHON := $(abspath $(PY))

.PHONY: demo test install dev dev-test rust-test wheel-check stubtest pytest bench gpu-test gpu-bench mutants clean

$(VENV)/.ready: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.9,<2" "torch>=2.4" "numpy>=1.26" "pytest>=8" "hypothesis>=6.100" "pytest-benchmark>=4" "mypy>=1.10" "scikit-learn>=1.3" "tqdm>=4.60" "matplotlib>=3.7"
	# the CUDA headers (crt/mma.h) NVRTC needs for the tensor-core kernels, matching torch's NVRTC release
	$(PY) -m pip install -q "nvidia-cuda-nvcc==$$($(PY) -c 'import importlib.metadata as m; print(".".join(m.version("nvidia-cuda-nvrtc").split(".")[:2]))').*"
	touch $@

# Build the release wheel and install it (not an editable build): tests run against what users get.
install: $(VENV)/.ready
	rm -rf $(WHEEL_DIR) python/sparsekit/_core*.so
	$(VENV)/bin/maturin build --release --locked -q -o $(WHEEL_DIR)
	$(PY) -m pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/sparsekit-*.whl

# Development loop: a fast (no-LTO) build of the extension placed beside the sources, tests run
# from the checkout (PYTHONPATH=python). `make install` removes that copy again.
dev: $(VENV)/.ready
	cargo build --profile fast --locked -p sparsekit-py
	cp target/fast/lib_core.so python/sparsekit/_core.abi3.so

dev-test: dev
	PYTHONPATH=python $(PY) -m pytest -q $(TESTS)

demo: install
	$(PY) -m sparsekit demo

rust-test: $(VENV)/.ready
	cargo test --workspace --locked

# The wheel must carry the extension, its stubs, py.typed and the CUDA sources the loader reads.
wheel-check: install
	$(PY) -m zipfile -l $(WHEEL_DIR)/sparsekit-*.whl
	$(PY) .ci/check_wheel.py $(WHEEL_DIR)/sparsekit-*.whl

# Stubs match the compiled module, and the package type-checks against them.
stubtest: install
	$(PY) -m mypy.stubtest sparsekit._core
	$(PY) -m mypy

pytest: install
	cd tests && ../$(PY) -c "import sparsekit, sys; assert 'site-packages' in sparsekit.__file__, sparsekit.__file__; print('testing', sparsekit.__file__)"
	$(PY) -m pytest -q

test: rust-test wheel-check stubtest pytest

# On a machine with a CUDA GPU: the GPU suite (skipped, with the reason, elsewhere) and the GPU benchmarks.
gpu-test: install
	$(VENV)/bin/pip install -q "cupy-cuda13x>=14"
	$(PY) -m pytest -q -m gpu tests/test_gpu.py

gpu-bench: install
	$(VENV)/bin/pip install -q "cupy-cuda13x>=14"
	$(PY) -m pytest -q -m gpu benches/bench_gpu_select.py --benchmark-enable --benchmark-columns=median,min,rounds

bench: install
	cargo bench -p sparsekit-core --bench select -- --warm-up-time 1 --measurement-time 4
	$(PY) benches/report.py --repeat 3 --rust

# Mutation check of the CUDA kernels on the shim (cuda/sim/mutants.py): each __syncthreads() removed and
# each atomicAdd made a plain +=, one at a time; every mutant must be caught by the race-checked tests.
mutants: dev
	$(PY) cuda/sim/mutants.py $(MUTANT_ARGS)

clean:
	rm -rf target $(VENV)
