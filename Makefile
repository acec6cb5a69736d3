# Fresh machine: `make serve` (install, fetch the default model, serve on :8188) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8188
MODEL ?= smollm2-135m-instruct
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install model serve test bench golden clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

model: install
	$(PY) -m fastdeploy.model_store

serve: model
	$(PY) -m fastdeploy.entrypoints.openai.api_server --model $(MODEL) --port $(PORT) $(SERVE_ARGS)

test: model
	FASTDEPLOY_REQUIRE_NATIVE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: model
	$(PY) scripts/bench_offline.py

# Dev-only: regenerate tests/data/golden_smollm2.json with HF transformers + torch (CPU) in .venv-ref.
golden: model
	$(PYTHON) -m venv .venv-ref
	.venv-ref/bin/pip install --quiet torch==2.13.0 transformers gguf sentencepiece numpy accelerate
	.venv-ref/bin/python scripts/make_golden.py --gguf "$$($(PY) -m fastdeploy.model_store)"

clean:
	rm -rf $(VENV) build *.egg-info log
