# Our own installs pin the CPU torch wheel that lies on disk here; GPU users install their torch first (README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test bench clean train-tiny

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,eval]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e ".[plot]"
	$(BIN)/dllmq demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -x --timeout=900

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

train-tiny: $(STAMP)
	$(BIN)/python examples/train_tiny_dllm.py --out dllmq/bundled/tiny-llada --tokenizer dllmq/bundled/tiny-llada
	$(BIN)/python benchmarks/gpu_session.py shard dllmq/bundled/tiny-llada

clean:
	rm -rf $(VENV) build *.egg-info
