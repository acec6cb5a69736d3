# Fresh machine: `make serve` (install, fetch the default model, serve on :8188) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8188
MODEL ?= smollm2-135m-instruct
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install model serve test bench bench-venv golden clean

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

# The slowest tests are listed at the end of every run, to keep the suite's time in view.
test: model
	FASTDEPLOY_REQUIRE_NATIVE=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Peers for the serving bench (scripts/bench_compare.py), both compiled from the pinned sdist of
# llama-cpp-python on this machine: its OpenAI server in .venv-bench, and llama.cpp's own
# llama-server built from the llama.cpp sources vendored in that sdist.
BENCH_VENV ?= .venv-bench
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_SERVER_BUILD ?= build/llama-server

$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check \
		--no-binary llama-cpp-python 'llama-cpp-python[server]==$(LLAMA_CPP_PYTHON_VERSION)'
	touch $@

$(BENCH_VENV)/bin/llama-server: | $(BENCH_VENV)/.installed
	rm -rf $(LLAMA_SERVER_BUILD) && mkdir -p $(LLAMA_SERVER_BUILD)
	$(BENCH_VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
		'llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)' -d $(LLAMA_SERVER_BUILD)
	tar -xzf $(LLAMA_SERVER_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMA_SERVER_BUILD)
	cmake \
		-S $(LLAMA_SERVER_BUILD)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)/vendor/llama.cpp \
		-B $(LLAMA_SERVER_BUILD)/cmake -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
		-DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT=llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)
	cmake --build $(LLAMA_SERVER_BUILD)/cmake --target llama-server -j 2
	cp $(LLAMA_SERVER_BUILD)/cmake/bin/llama-server $@

bench-venv: $(BENCH_VENV)/.installed $(BENCH_VENV)/bin/llama-server

bench: model bench-venv
	$(PY) scripts/bench_offline.py
	$(PY) scripts/bench_compare.py --bench-python $(BENCH_VENV)/bin/python

# Dev-only: regenerate tests/data/golden_smollm2.json with HF transformers + torch (CPU) in .venv-ref.
golden: model
	$(PYTHON) -m venv .venv-ref
	.venv-ref/bin/pip install --quiet torch==2.13.0 transformers gguf sentencepiece numpy accelerate
	.venv-ref/bin/python scripts/make_golden.py --gguf "$$($(PY) -m fastdeploy.model_store)"

clean:
	rm -rf $(VENV) build *.egg-info log
